"""Init step of a BlueMarble shard-node pod: writes the zone and region labels of the
Kubernetes node the pod runs on to files the node process reads into --zone/--region.

Why: the downward API exposes the pod's own fields, not its node's labels, and placement
spreads a shard's replicas over zones. Reads GET /api/v1/nodes/$NODE_NAME with the pod's
service-account token (the chart grants `get nodes` only). A label the node lacks (a
single-zone cluster) is written as an empty file: the node then runs without a zone.
Standard library only: it runs with the BlueMarble image's python.

Usage: topology.py OUT_DIR   (env NODE_NAME, ZONE_LABEL, REGION_LABEL, KUBERNETES_SERVICE_HOST/PORT)
"""

from __future__ import annotations

import json
import os
import pathlib
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

SA_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEADLINE_S = 120.0


def labels_of(node: Mapping[str, object], zone_label: str, region_label: str) -> tuple[str, str]:
    """The (zone, region) label values of a Node object; '' for a label it lacks."""
    metadata = node.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    if not isinstance(labels, Mapping):
        return "", ""
    return str(labels.get(zone_label, "")), str(labels.get(region_label, ""))


def fetch_node(name: str) -> Mapping[str, object]:
    """The Node object from the API server; retries transient failures until DEADLINE_S.

    Raises PermissionError on 401/403 and LookupError on 404: retrying does not fix those.
    """
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    url = f"https://{host}:{port}/api/v1/nodes/{name}"
    context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    deadline = time.monotonic() + DEADLINE_S
    delay_s = 0.5
    while True:
        token = (SA_DIR / "token").read_text().strip()  # re-read: projected tokens rotate
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                node: Mapping[str, object] = json.load(response)
                return node
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                hint = "the ServiceAccount needs `get nodes`"
                raise PermissionError(f"reading node {name}: HTTP {e.code}; {hint}") from e
            if e.code == 404:
                raise LookupError(f"node {name} not found") from e
            failure = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            failure = str(e)
        if time.monotonic() + delay_s > deadline:
            raise TimeoutError(f"reading node {name}: {failure} (gave up after {DEADLINE_S:.0f} s)")
        print(f"reading node {name}: {failure}; retrying in {delay_s:.1f} s", file=sys.stderr)
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 10.0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = pathlib.Path(argv[1])
    name = os.environ["NODE_NAME"]
    zone_label = os.environ.get("ZONE_LABEL", "topology.kubernetes.io/zone")
    region_label = os.environ.get("REGION_LABEL", "topology.kubernetes.io/region")
    try:
        zone, region = labels_of(fetch_node(name), zone_label, region_label)
    except (PermissionError, LookupError, TimeoutError) as e:
        print(str(e), file=sys.stderr)
        return 1
    (out / "zone").write_text(zone)
    (out / "region").write_text(region)
    print(f"node {name}: zone {zone!r} ({zone_label}), region {region!r} ({region_label})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

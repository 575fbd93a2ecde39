"""The Helm chart renders for the default, external-etcd and TLS values, every document
validates strictly against Kubernetes 1.30, and the templates are wired to each other and
to the processes: Service selectors and ports, probes, env names that are real flags,
volumes, the data dir, etcd endpoints, the TLS and admin-token files.

ServiceMonitor and PrometheusRule are Prometheus Operator CRDs whose schemas
kubernetes-validate does not ship: they are off by default; when on, only those two kinds
skip the strict validation and their structure is checked here instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.unit import helm_chart as hc
from tests.unit.helm_chart import Doc, Manifests

pytestmark = pytest.mark.skipif(
    hc.helm_template_tool() is None,
    reason="helm-template not found: set BLUEMARBLE_HELM_TEMPLATE or put it at ../shared/tools/helm-template",
)

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULL = f"{hc.RELEASE}-bluemarble"
CP, NODE, ETCD = f"{FULL}-controlplane", f"{FULL}-node", f"{FULL}-etcd"
BACKUP = f"{FULL}-etcd-backup"

EXTERNAL_ETCD: dict[str, Any] = {
    "etcd": {
        "enabled": False,
        "endpoints": ["etcd-a.db.example:2379", "etcd-b.db.example:2379"],
        "tls": {"enabled": True, "secretName": "etcd-client", "serverName": "etcd.db.example"},
        "auth": {"username": "bluemarble", "passwordSecret": "etcd-password"},
    }
}
TLS: dict[str, Any] = {
    "tls": {"enabled": True, "secretName": "bm-tls", "nodeSecretName": "bm-node-tls"},
    "auth": {"adminTokenSecret": "bm-admin"},
}
OPTIONAL: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "networkPolicy": {"enabled": True},
    "etcd": {"backup": {"enabled": True}},
    "tracing": {"otlpEndpoint": "http://otel-collector.obs:4317"},
    "controlplane": {"podLabels": {"example.com/team": "blue"}},
    "nodes": {"podLabels": {"tier": "game-servers_v1.2"}},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-etcd": EXTERNAL_ETCD,
    "tls": TLS,
    "optional": OPTIONAL,
    "everything": hc.merged(hc.merged(EXTERNAL_ETCD, TLS), OPTIONAL),
}

@pytest.fixture(scope="module")
def rendered() -> dict[str, Manifests]:
    return {name: Manifests.parse(hc.render_text(values)) for name, values in VARIANTS.items()}


def each_variant(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.parametrize("variant", list(VARIANTS))(test)


def env_names_of(parse_args: Callable[[list[str]], object]) -> set[str]:
    """The BLUEMARBLE_* variables a process reads: its --help names one per flag."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return set(re.findall(r"\[env (BLUEMARBLE_[A-Z0-9_]+)\]", re.sub(r"\s+", " ", out.getvalue())))


@pytest.fixture(scope="module")
def process_env() -> dict[str, set[str]]:
    from controlplane.server.main import parse_args as controlplane_args
    from shardnode.main import parse_args as node_args

    return {"controlplane": env_names_of(controlplane_args), "node": env_names_of(node_args)}


# ---- rendering and validation ------------------------------------------------------------


@each_variant
def test_every_document_validates_strictly_against_kubernetes_1_30(
    rendered: dict[str, Manifests], variant: str
) -> None:
    docs = rendered[variant].docs
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no schema shipped; structure checked by the tests below
        kubernetes_validate.validate(doc, hc.KUBE_VERSION, strict=True)
    crds = {d["kind"] for d in docs} & CRD_KINDS
    assert crds == (CRD_KINDS if variant in ("optional", "everything") else set())


def test_strict_validation_catches_a_misspelled_field(rendered: dict[str, Manifests]) -> None:
    doc = json.loads(json.dumps(rendered["default"].get("Deployment", CP)))
    pod_spec = doc["spec"]["template"]["spec"]
    pod_spec["containers"][0]["readinesProbe"] = pod_spec["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, hc.KUBE_VERSION, strict=True)


@each_variant
def test_values_match_the_schema(variant: str) -> None:
    schema = json.loads((hc.CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(hc.merged(hc.default_values(), VARIANTS[variant]), schema)


@pytest.mark.parametrize(
    "override",
    [
        {"controlplane": {"replicas": "three"}},
        {"etcd": {"enabled": False}},
        {"etcd": {"enabled": False, "endpoints": ["http://etcd:2379"]}},
        {"tls": {"enabled": True}},
        {"nodes": {"synchronous": "sometimes"}},
        {"controlplane": {"grpcPrt": 7000}},
        # What the processes would refuse at start (a crash loop after a "successful" install):
        {"controlplane": {"shards": 419}},
        {"controlplane": {"leaseTtlS": 1}},
        {"controlplane": {"replicationFactor": 8}},
        {"nodes": {"capacity": 2_000_000}},
        {"etcd": {"replicas": 2}},
        {"etcd": {"quotaBackendBytes": 1024}},
        {"clusterName": "Prod_EU.1"},  # the control plane takes only a DNS label
        {"clusterName": "a" * 64},
        {"nodes": {"persistence": {"size": "0"}}},
        {"nodes": {"persistence": {"size": -5}}},
        {"etcd": {"persistence": {"size": "0Gi"}}},
        {"controlplane": {"resources": {"requests": {"cpu": -1}}}},
        # Labels the API server would refuse (over 63 characters, spaces; a bad key):
        {"controlplane": {"podLabels": {"team": "a label value with spaces that is far too long " * 2}}},
        {"nodes": {"podLabels": {"bad key!": "x"}}},
        {"nodes": {"podLabels": {"team": "-starts-with-a-dash"}}},
        # A random framed port no Service or NetworkPolicy could name; names that are no DNS label:
        {"nodes": {"framesPort": 0}},
        {"controlplane": {"framesPort": 0}},
        {"nameOverride": "BlueMarble"},
        {"fullnameOverride": "9-my"},
        {"etcd": {"backup": {"keep": 0}}},
        {"etcd": {"backup": {"schedule": "hourly"}}},
        {"etcd": {"backup": {"persistence": {"size": "0"}}}},
        {"etcd": {"image": {"tag": ""}}},  # would render "image: quay.io/coreos/etcd:"
    ],
)
def test_the_schema_refuses_bad_values(override: dict[str, Any]) -> None:
    schema = json.loads((hc.CHART / "values.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(hc.merged(hc.default_values(), override), schema)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"etcd": {"enabled": False}}, "etcd.endpoints"),
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"etcd": {"enabled": False, "endpoints": ["e:2379"], "auth": {"username": "u"}}}, "passwordSecret"),
        ({"controlplane": {"metricsPort": 7000}}, "controlplane.grpcPort and controlplane.metricsPort"),
        ({"nodes": {"grpcPort": 9100}}, "nodes.grpcPort and nodes.metricsPort"),
        ({"nodes": {"framesPort": 7101}}, "nodes.framesPort 7101 is also the gRPC or metrics port"),
        ({"controlplane": {"framesPort": 9100}}, "controlplane.framesPort 9100 is also the gRPC or metrics port"),
        ({"etcd": {"tls": {"enabled": True, "secretName": "etcd-tls"}}}, "for an external etcd"),
        ({"etcd": {"auth": {"username": "u", "passwordSecret": "p"}}}, "for an external etcd"),
        ({"nodes": {"leaveTimeoutSeconds": 120, "terminationGracePeriodSeconds": 30}},
         "nodes.leaveTimeoutSeconds (120) must be below nodes.terminationGracePeriodSeconds (30)"),
        ({"controlplane": {"podLabels": {"app.kubernetes.io/component": "evil"}}},
         "controlplane.podLabels may not set app.kubernetes.io/component"),
        ({"nodes": {"podLabels": {"app.kubernetes.io/instance": "x"}}}, "nodes.podLabels may not set"),
        ({"etcd": {"endpoints": ["etcd.example:2379"]}}, "etcd.endpoints is set but etcd.enabled is true"),
        ({"controlplane": {"preStopSleepSeconds": 30}}, "controlplane.preStopSleepSeconds (30) must be below"),
        ({"nodes": {"replicas": 2}}, "nodes.replicas (2) is below controlplane.replicationFactor (3)"),
    ],
)
def test_the_chart_refuses_incomplete_values(override: dict[str, Any], message: str) -> None:
    with pytest.raises(hc.RenderError, match=re.escape(message)):
        hc.render_text(override)


# ---- services, selectors, ports, probes --------------------------------------------------


@each_variant
def test_services_and_pdbs_select_the_pods_of_one_workload(rendered: dict[str, Manifests], variant: str) -> None:
    m = rendered[variant]
    for workload in m.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert hc.matches(workload["spec"]["selector"]["matchLabels"], labels)
    for selecting in m.of_kind("Service") + m.of_kind("PodDisruptionBudget"):
        selector = selecting["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        chosen = [w for w in m.workloads() if hc.matches(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"{selecting['kind']}/{selecting['metadata']['name']} selects {hc.all_names(chosen)}"
        if selecting["kind"] == "Service":
            ports = {p["name"]: p["containerPort"] for c in hc.containers(chosen[0]) for p in c.get("ports", [])}
            for port in selecting["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), f"{selecting['metadata']['name']}: {target}"


def test_pod_labels_join_the_charts_own(rendered: dict[str, Manifests]) -> None:
    labels = rendered["optional"].get("Deployment", CP)["spec"]["template"]["metadata"]["labels"]
    assert labels["example.com/team"] == "blue" and labels["app.kubernetes.io/component"] == "controlplane"
    labels = rendered["optional"].get("StatefulSet", NODE)["spec"]["template"]["metadata"]["labels"]
    assert labels["tier"] == "game-servers_v1.2" and labels["app.kubernetes.io/component"] == "node"


def test_pdbs_cover_the_control_plane_nodes_and_etcd(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    pdbs = {d["metadata"]["name"]: d["spec"] for d in m.of_kind("PodDisruptionBudget")}
    assert set(pdbs) == {CP, NODE, ETCD}
    assert pdbs[CP] == {**pdbs[CP], "maxUnavailable": 1}
    assert pdbs[NODE]["maxUnavailable"] == 1
    assert pdbs[ETCD]["maxUnavailable"] == 1  # a 3-member etcd keeps its majority
    assert {d["metadata"]["name"] for d in rendered["external-etcd"].of_kind("PodDisruptionBudget")} == {CP, NODE}


@pytest.mark.parametrize("variant", ["default", "external-etcd"])
def test_probes_are_native_grpc_health_checks_on_the_grpc_port(rendered: dict[str, Manifests], variant: str) -> None:
    m = rendered[variant]
    # The process ("") for startup and liveness; a node is ready only once its ShardNode
    # service is (registered, copies caught up), so a rolling update waits for that.
    for kind, name, container, ready in (
        ("Deployment", CP, "controlplane", ""),
        ("StatefulSet", NODE, "node", "bluemarble.v1.ShardNode"),
    ):
        c = hc.container(m.get(kind, name), container)
        grpc_port = hc.port_named(c, "grpc")
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port, "service": ""}, f"{name} {probe}"
        assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ready}, name
        assert c["livenessProbe"]["failureThreshold"] > c["readinessProbe"]["failureThreshold"]


def test_with_tls_the_probes_run_the_tls_health_check_from_the_mounted_scripts(rendered: dict[str, Manifests]) -> None:
    m = rendered["tls"]
    scripts = m.get("ConfigMap", f"{FULL}-scripts")["data"]
    for kind, name, container, server_name, ready in (
        ("Deployment", CP, "controlplane", f"{CP}.{hc.NAMESPACE}.svc", ""),
        ("StatefulSet", NODE, "node", "", "bluemarble.v1.ShardNode"),
    ):
        c = hc.container(m.get(kind, name), container)
        mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            python, script, address, name_checked, *service = c[probe]["exec"]["command"]
            assert service == ([ready] if probe == "readinessProbe" else []), f"{name} {probe}"
            assert python == "python3" and name_checked == server_name
            assert script == f"{mounts['scripts']}/health_probe.py" and "health_probe.py" in scripts
            assert hc.host_port(address)[1] == hc.port_named(c, "grpc")


def test_etcd_probes_and_ports(rendered: dict[str, Manifests]) -> None:
    etcd = hc.container(rendered["default"].get("StatefulSet", ETCD), "etcd")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        hc.port_named(etcd, etcd[probe]["httpGet"]["port"])
    args = dict(a.split("=", 1) for a in etcd["args"])
    assert args["--listen-metrics-urls"].endswith(f":{hc.port_named(etcd, 'metrics')}")
    assert args["--listen-client-urls"].endswith(f":{hc.port_named(etcd, 'client')}")
    assert args["--listen-peer-urls"].endswith(f":{hc.port_named(etcd, 'peer')}")
    assert args["--initial-cluster"].count("=http://") == 3


# ---- env: names are real flags, addresses point at the right objects ---------------------


@each_variant
def test_env_names_are_flags_of_the_processes(
    rendered: dict[str, Manifests], process_env: dict[str, set[str]], variant: str
) -> None:
    m = rendered[variant]
    for kind, name, container, process in (
        ("Deployment", CP, "controlplane", "controlplane"),
        ("StatefulSet", NODE, "node", "node"),
    ):
        c = hc.container(m.get(kind, name), container)
        ours = {n for n in hc.env_of(c) if n.startswith("BLUEMARBLE_")}
        assert ours - process_env[process] == set(), f"{container}: env that no flag reads"
        defined: set[str] = set()
        for entry in c["env"]:  # $(VAR) expands only variables defined earlier in the list
            for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", entry.get("value", "")):
                assert ref in defined, f"{container}: {entry['name']} uses $({ref}) before it is defined"
            defined.add(entry["name"])


def test_the_env_check_catches_a_misspelled_flag(process_env: dict[str, set[str]]) -> None:
    assert "BLUEMARBLE_LISTEN" in process_env["node"] and "BLUEMARBLE_LISTN" not in process_env["node"]
    assert "BLUEMARBLE_NODE_ID" in process_env["node"] and "BLUEMARBLE_NODE_ID" not in process_env["controlplane"]


@each_variant
def test_listen_addresses_match_the_container_ports(rendered: dict[str, Manifests], variant: str) -> None:
    m = rendered[variant]
    for kind, name, container in (("Deployment", CP, "controlplane"), ("StatefulSet", NODE, "node")):
        c = hc.container(m.get(kind, name), container)
        assert hc.env_value(c, "BLUEMARBLE_LISTEN") == f"0.0.0.0:{hc.port_named(c, 'grpc')}"
        assert hc.env_value(c, "BLUEMARBLE_METRICS_LISTEN") == f"0.0.0.0:{hc.port_named(c, 'metrics')}"


def test_node_identity_advertise_and_control_plane_addresses(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    sts = m.get("StatefulSet", NODE)
    node = hc.container(sts, "node")
    env = hc.env_of(node)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert hc.env_value(node, "BLUEMARBLE_NODE_ID") == "$(POD_NAME)"
    headless = m.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    host, port = hc.host_port(hc.env_value(node, "BLUEMARBLE_ADVERTISE"))
    assert host == f"$(POD_NAME).{headless['metadata']['name']}.{hc.NAMESPACE}.svc"
    assert port == hc.port_named(node, "grpc")
    cp_host, cp_port = hc.host_port(hc.env_value(node, "BLUEMARBLE_CONTROL_PLANE"))
    service = m.get("Service", CP)
    assert cp_host == f"{service['metadata']['name']}.{hc.NAMESPACE}.svc"
    assert cp_port in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    cp = hc.container(m.get("Deployment", CP), "controlplane")
    assert cp_port == hc.port_named(cp, "grpc")
    assert hc.env_value(cp, "BLUEMARBLE_REPLICA_ID") == "$(POD_NAME)"


def test_the_data_dir_is_the_persistent_volume_claim(rendered: dict[str, Manifests]) -> None:
    sts = rendered["default"].get("StatefulSet", NODE)
    node = hc.container(sts, "node")
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {v["name"]: v["mountPath"] for v in node["volumeMounts"]}
    assert mounts["data"] == hc.env_value(node, "BLUEMARBLE_DATA_DIR") == "/data"
    assert claims["data"]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "data" not in {v["name"] for v in hc.pod_spec(sts)["volumes"]}  # the claim, not an emptyDir


def test_etcd_endpoint_is_the_client_service_of_the_charts_etcd(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    etcd = m.get("StatefulSet", ETCD)
    headless = m.get("Service", etcd["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    client = m.get("Service", ETCD)
    assert client["spec"].get("clusterIP") != "None"
    assert client["spec"]["selector"].items() <= etcd["spec"]["template"]["metadata"]["labels"].items()
    client_port = hc.port_named(hc.container(etcd, "etcd"), "client")
    assert [p["port"] for p in client["spec"]["ports"] if p["name"] == "client"] == [client_port]
    # One DNS name (controlplane.store.etcd.grpc_target dials it through gRPC's resolver).
    endpoint = hc.env_value(hc.container(m.get("Deployment", CP), "controlplane"), "BLUEMARBLE_ETCD")
    assert endpoint == f"{ETCD}.{hc.NAMESPACE}.svc:{client_port}"
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["podManagementPolicy"] == "Parallel"


def test_a_release_name_that_is_no_dns_label_is_refused() -> None:
    with pytest.raises(hc.RenderError, match="must start with a lower-case letter"):
        hc.render_text({}, release="1bm")


def test_etcd_stays_ready_and_alive_out_of_space(rendered: dict[str, Manifests]) -> None:
    """A member out of its quota (the NOSPACE alarm) still serves reads, compaction and
    defragmentation: failing its probes would take every endpoint away and restart it
    in a loop (the alarm survives restarts)."""
    etcd = hc.container(rendered["default"].get("StatefulSet", ETCD), "etcd")
    paths = {probe: etcd[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all("exclude=NOSPACE" in path for path in paths.values()), paths
    assert "serializable=true" in paths["livenessProbe"] and "serializable" not in paths["readinessProbe"]


def test_pod_templates_do_not_change_with_the_chart_version(rendered: dict[str, Manifests]) -> None:
    """A chart bump alone must not restart etcd or drain every node: no helm.sh/chart label
    in a pod template (etcd's carries no app version either: it runs its own image)."""
    m = rendered["default"]
    for kind, name in (("Deployment", CP), ("StatefulSet", NODE), ("StatefulSet", ETCD)):
        labels = m.get(kind, name)["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels, (name, labels)
        assert ("app.kubernetes.io/version" in labels) == (name != ETCD), (name, labels)
        assert "helm.sh/chart" in m.get(kind, name)["metadata"]["labels"]  # the object itself keeps it


@pytest.mark.parametrize("tls", [False, True])
def test_a_chart_version_bump_changes_no_pod_template(tmp_path: Any, tls: bool) -> None:
    """Rendered from a copy whose Chart.yaml says another version (nothing else changed):
    every pod template, annotations included (the scripts' checksum hashes their text, not
    the ConfigMap with its chart label), is the same, so an upgrade restarts nothing."""
    import shutil
    from pathlib import Path

    values = {"tls": {"enabled": True, "secretName": "cp-tls", "nodeSecretName": "node-tls"}} if tls else {}
    bumped = Path(tmp_path) / "bluemarble"
    shutil.copytree(hc.CHART, bumped)
    chart_yaml = bumped / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace("\nversion: ", "\nversion: 9.9.9-", 1))
    before = Manifests.parse(hc.render_text(values))
    after = Manifests.parse(hc.render_text(values, chart=bumped))
    for kind, name in (("Deployment", CP), ("StatefulSet", NODE), ("StatefulSet", ETCD)):
        assert after.get(kind, name)["metadata"]["labels"] != before.get(kind, name)["metadata"]["labels"]  # bumped
        assert after.get(kind, name)["spec"]["template"] == before.get(kind, name)["spec"]["template"], name


def test_nodes_scale_down_one_at_a_time_and_default_to_more_than_the_replication_factor(
    rendered: dict[str, Manifests],
) -> None:
    """Scaling down stops one node at a time, each drained first; and by default a stopping
    node can be drained at all (its copies need other nodes to go to)."""
    nodes = rendered["default"].get("StatefulSet", NODE)
    assert nodes["spec"]["podManagementPolicy"] == "OrderedReady"
    factor = hc.default_values()["controlplane"]["replicationFactor"]
    assert nodes["spec"]["replicas"] >= factor + 1


def test_external_etcd_endpoints_tls_and_password(rendered: dict[str, Manifests]) -> None:
    m = rendered["external-etcd"]
    assert not [d for d in m.docs if d["metadata"]["name"].startswith(ETCD)]
    deployment = m.get("Deployment", CP)
    cp = hc.container(deployment, "controlplane")
    assert hc.env_value(cp, "BLUEMARBLE_ETCD") == "etcd-a.db.example:2379,etcd-b.db.example:2379"
    files = mounted_files(deployment, cp)
    assert files[hc.env_value(cp, "BLUEMARBLE_ETCD_CA")] == ("etcd-client", "ca.crt")
    assert files[hc.env_value(cp, "BLUEMARBLE_ETCD_CERT")] == ("etcd-client", "tls.crt")
    assert files[hc.env_value(cp, "BLUEMARBLE_ETCD_KEY")] == ("etcd-client", "tls.key")
    assert hc.env_value(cp, "BLUEMARBLE_ETCD_SERVER_NAME") == "etcd.db.example"
    assert hc.env_value(cp, "BLUEMARBLE_ETCD_USER") == "bluemarble"
    password = hc.env_of(cp)["BLUEMARBLE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "etcd-password", "key": "password"}


# ---- volumes, TLS, admin token ------------------------------------------------------------


def mounted_files(workload: Doc, c: Doc) -> dict[str, tuple[str, str]]:
    """Path -> (Secret name, key) of the Secret files the container sees at the paths its
    BLUEMARBLE_* env names (a Secret volume without items shows every key as a file)."""
    volumes = {v["name"]: v for v in hc.pod_spec(workload)["volumes"]}
    secret_dirs = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in c.get("volumeMounts", [])
        if "secret" in volumes.get(m["name"], {})
    }
    files: dict[str, tuple[str, str]] = {}
    for entry in c.get("env", []):
        directory, _, file_name = entry.get("value", "").rpartition("/")
        secret = secret_dirs.get(directory)
        if secret is None:
            continue
        keys = {i["path"]: i["key"] for i in secret.get("items", [])}
        if not keys or file_name in keys:
            files[entry["value"]] = (secret["secretName"], keys.get(file_name, file_name))
    return files


@each_variant
def test_every_mount_has_its_volume_and_every_config_map_exists(rendered: dict[str, Manifests], variant: str) -> None:
    m = rendered[variant]
    config_maps = {d["metadata"]["name"] for d in m.of_kind("ConfigMap")} | {"kube-root-ca.crt"}
    for workload in m.workloads():
        volumes = {v["name"]: v for v in hc.pod_spec(workload).get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        assert not set(volumes) & claims
        for c in hc.containers(workload):
            paths = [v["mountPath"] for v in c.get("volumeMounts", [])]
            assert len(paths) == len(set(paths)), f"{c['name']}: a path mounted twice"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{c['name']}: {mount['name']}"
        for node in hc.walk(list(volumes.values())):
            if isinstance(node, dict) and "configMap" in node:
                assert node["configMap"]["name"] in config_maps


def test_tls_secret_is_mounted_and_the_env_points_at_its_files(rendered: dict[str, Manifests]) -> None:
    m = rendered["tls"]
    for kind, name, container, secret in (
        ("Deployment", CP, "controlplane", "bm-tls"),
        ("StatefulSet", NODE, "node", "bm-node-tls"),
    ):
        workload = m.get(kind, name)
        c = hc.container(workload, container)
        files = mounted_files(workload, c)
        assert files[hc.env_value(c, "BLUEMARBLE_TLS_CERT")] == (secret, "tls.crt")
        assert files[hc.env_value(c, "BLUEMARBLE_TLS_KEY")] == (secret, "tls.key")
        assert files[hc.env_value(c, "BLUEMARBLE_TLS_CA")] == (secret, "ca.crt")
        tls_mount = next(v for v in c["volumeMounts"] if v["mountPath"] == "/etc/bluemarble/tls")
        assert tls_mount["readOnly"] is True
    cp = hc.container(m.get("Deployment", CP), "controlplane")
    assert mounted_files(m.get("Deployment", CP), cp)[hc.env_value(cp, "BLUEMARBLE_ADMIN_TOKEN_FILE")] == (
        "bm-admin",
        "token",
    )
    for variant in ("default", "external-etcd"):
        for workload in rendered[variant].workloads():
            for c in hc.containers(workload):
                assert not {n for n in hc.env_of(c) if n.startswith("BLUEMARBLE_TLS") or "ADMIN" in n}


@each_variant
def test_containers_run_non_root_read_only_without_capabilities(rendered: dict[str, Manifests], variant: str) -> None:
    for workload in rendered[variant].workloads():
        pod = hc.pod_spec(workload)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in hc.containers(workload):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_image_defaults_to_the_charts_app_version(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    for workload in (m.get("Deployment", CP), m.get("StatefulSet", NODE)):
        assert {c["image"] for c in hc.containers(workload)} == {"bluemarble:0.1.0"}
    custom = Manifests.parse(hc.render_text({"image": {"repository": "reg.example/bm", "tag": "1.2.3"}}))
    assert hc.container(custom.get("Deployment", CP), "controlplane")["image"] == "reg.example/bm:1.2.3"


# ---- zone from the node's labels, topology spread ----------------------------------------


def test_zone_comes_from_the_kubernetes_node_through_the_init_step(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    sts = m.get("StatefulSet", NODE)
    pod = hc.pod_spec(sts)
    init, node = hc.container(sts, "topology"), hc.container(sts, "node")
    assert hc.env_of(init)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    init_mounts = {v["name"]: v["mountPath"] for v in init["volumeMounts"]}
    node_mounts = {v["name"]: v["mountPath"] for v in node["volumeMounts"]}
    out_dir = init["command"][-1]
    assert init["command"][:2] == ["python3", f"{init_mounts['scripts']}/topology.py"]
    assert init_mounts["topology"] == out_dir == node_mounts["topology"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["topology"]
    assert "topology.py" in m.get("ConfigMap", f"{FULL}-scripts")["data"]
    script = node["command"][2]
    assert f"{out_dir}/zone" in script and "BLUEMARBLE_ZONE" in script and "exec bluemarble-node" in script
    # Only the init container gets an API token, and the role lets it read nodes, nothing else.
    assert pod["automountServiceAccountToken"] is False
    assert "kube-api-access" in init_mounts and "kube-api-access" not in node_mounts
    binding = m.of_kind("ClusterRoleBinding")[0]
    subject = {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": hc.NAMESPACE}
    assert binding["subjects"] == [subject]
    role = m.get("ClusterRole", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    m.get("ServiceAccount", pod["serviceAccountName"])


def test_a_static_zone_needs_no_init_step_or_cluster_role() -> None:
    m = Manifests.parse(hc.render_text({"nodes": {"zone": "eu-1a", "region": "eu-1"}}))
    node = hc.container(m.get("StatefulSet", NODE), "node")
    assert "initContainers" not in hc.pod_spec(m.get("StatefulSet", NODE))
    assert hc.env_value(node, "BLUEMARBLE_ZONE") == "eu-1a" and node["command"] == ["bluemarble-node"]
    assert not m.of_kind("ClusterRole")


def test_cluster_roles_of_releases_in_two_namespaces_never_share_a_name() -> None:
    """"prod" in "game-eu" and "eu-prod" in "game" joined with '-' gave one name; a
    namespace holds no dot, so "<namespace>.<fullname>" cannot collide."""
    names = [
        Manifests.parse(hc.render_text({}, release=release, namespace=namespace)).of_kind("ClusterRole")[0]
        ["metadata"]["name"]
        for release, namespace in (("prod", "game-eu"), ("eu-prod", "game"))
    ]
    assert names[0] != names[1], names


def test_topology_spread_over_zones(rendered: dict[str, Manifests]) -> None:
    m = rendered["default"]
    deployment = m.get("Deployment", CP)
    assert deployment["spec"]["replicas"] == 3
    for workload in (deployment, m.get("StatefulSet", NODE), m.get("StatefulSet", ETCD)):
        constraints = hc.pod_spec(workload)["topologySpreadConstraints"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert "topology.kubernetes.io/zone" in {c["topologyKey"] for c in constraints}
        assert all(hc.matches(c["labelSelector"]["matchLabels"], labels) for c in constraints)


# ---- monitoring: ServiceMonitor, alerts, dashboard, network policy -----------------------


def metric_names() -> set[str]:
    """Every series name bluemarble/runtime/metrics.py exposes (counters with _total,
    histograms with _bucket/_sum/_count)."""
    from prometheus_client.metrics import MetricWrapperBase

    from bluemarble.runtime import metrics

    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
                names |= {family.name + s for s in suffixes}
    return names


def used_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bbluemarble_[a-z0-9_]+", expr))


def test_service_monitor_scrapes_the_metrics_ports(rendered: dict[str, Manifests]) -> None:
    m = rendered["optional"]
    monitor = m.of_kind("ServiceMonitor")[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [hc.NAMESPACE]}
    (expression,) = spec["selector"]["matchExpressions"]
    scraped = [
        s for s in m.of_kind("Service")
        if hc.matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        and s["metadata"]["labels"].get(expression["key"]) in expression["values"]
    ]
    assert {s["metadata"]["name"] for s in scraped} == {CP, NODE}
    (endpoint,) = spec["endpoints"]
    for service in scraped:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_alerts_query_metrics_the_processes_expose(rendered: dict[str, Manifests]) -> None:
    rule = rendered["optional"].of_kind("PrometheusRule")[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert {"BlueMarbleNoLeader", "BlueMarbleNodeLeaseChurn", "BlueMarbleReplicationLag",
            "BlueMarbleTradesInDoubt"} <= set(alerts)
    selector = f'namespace="{hc.NAMESPACE}", pod=~"{FULL}-(controlplane-.+|node-[0-9]+)"'
    assert alerts["BlueMarbleNoLeader"]["expr"] == f"max(bluemarble_is_leader{{{selector}}}) == 0"
    # ...which cannot fire with no series at all: every replica down, or none scraped.
    assert alerts["BlueMarbleControlPlaneAbsent"]["expr"] == f"absent(bluemarble_is_leader{{{selector}}})"
    known = metric_names()
    for name, alert in alerts.items():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
        assert alert["labels"]["severity"] in {"critical", "warning"} and alert["annotations"]["summary"]
        assert used_metrics(alert["expr"]) and used_metrics(alert["expr"]) <= known, name


def test_the_metric_check_knows_a_missing_metric() -> None:
    known = metric_names()
    assert "bluemarble_trade_phase_seconds_bucket" in known and "bluemarble_is_leader" in known
    assert not used_metrics("max(bluemarble_is_leaders) == 0") <= known


def test_grafana_dashboard(rendered: dict[str, Manifests]) -> None:
    config_map = rendered["default"].get("ConfigMap", f"{FULL}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["bluemarble.json"])
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    known = metric_names()
    for title, queries in exprs.items():
        for expr in queries:
            assert used_metrics(expr) and used_metrics(expr) <= known, title
    needed = ["bluemarble_registered_nodes", "bluemarble_is_leader", "bluemarble_shards_without_primary",
              "bluemarble_trades_total", "bluemarble_trade_phase_seconds_bucket", "bluemarble_replication_lag_seconds"]
    everything = " ".join(q for queries in exprs.values() for q in queries)
    assert all(n in everything for n in needed)
    assert 'sum by (kind, outcome) (rate(bluemarble_trades_total' in everything


def test_two_releases_in_one_namespace_keep_their_alerts_and_dashboards_apart() -> None:
    """Alerts and dashboard panels select the release's own pods; the dashboard's uid and
    title name the release, so Grafana keeps one dashboard per release."""
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    found: dict[str, tuple[str, str, str]] = {}
    for release in ("eu", "eu-2"):
        m = Manifests.parse(hc.render_text(values, release=release))
        full = f"{release}-bluemarble"
        config_map = m.get("ConfigMap", f"{full}-dashboard")
        dashboard = json.loads(config_map["data"]["bluemarble.json"])
        (group,) = m.of_kind("PrometheusRule")[0]["spec"]["groups"]
        exprs = [r["expr"] for r in group["rules"]] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        selectors = {re.search(r'\{(namespace="[^"]+", pod=~"[^"]+")', e).group(1) for e in exprs}  # type: ignore[union-attr]
        (selector,) = selectors  # every query selects the same pods
        pods = re.search(r'pod=~"([^"]+)"', selector).group(1)  # type: ignore[union-attr]
        for pod in (f"{full}-controlplane-7d9f8b6c5d-x2x4q", f"{full}-node-0", f"{full}-node-12"):
            assert re.fullmatch(pods, pod), (pods, pod)
        found[release] = (dashboard["uid"], dashboard["title"], pods)
        assert len(dashboard["uid"]) <= 40 and release in dashboard["title"]
    (uid_a, title_a, pods_a), (uid_b, title_b, pods_b) = found["eu"], found["eu-2"]
    assert uid_a != uid_b and title_a != title_b
    assert not re.fullmatch(pods_a, "eu-2-bluemarble-node-0") and not re.fullmatch(pods_b, "eu-bluemarble-node-0")


def test_long_release_names_are_cut_with_a_hash_so_they_stay_apart() -> None:
    long_a, long_b = "world-" + "x" * 40 + "-a", "world-" + "x" * 40 + "-b"
    names = []
    for release in (long_a, long_b):
        m = Manifests.parse(hc.render_text({}, release=release, show_only="templates/node-service.yaml"))
        (service,) = [s for s in m.of_kind("Service")]
        name = service["metadata"]["name"].removesuffix("-node")
        assert len(name) <= 40 and name.startswith("world-xxx")
        names.append(name)
    assert names[0] != names[1]
    short = Manifests.parse(hc.render_text({}, release="eu", show_only="templates/node-service.yaml"))
    assert short.of_kind("Service")[0]["metadata"]["name"] == "eu-bluemarble-node"  # short names unchanged


def test_etcd_quota_is_a_value_under_its_volume(rendered: dict[str, Manifests]) -> None:
    etcd = hc.container(rendered["default"].get("StatefulSet", ETCD), "etcd")
    (quota,) = [a for a in etcd["args"] if a.startswith("--quota-backend-bytes=")]
    defaults = hc.default_values()["etcd"]
    assert int(quota.split("=")[1]) == defaults["quotaBackendBytes"] < 2 * 1024**3
    assert defaults["persistence"]["size"] == "2Gi"
    custom = Manifests.parse(hc.render_text({"etcd": {"quotaBackendBytes": 4 * 1024**3,
                                                      "persistence": {"size": "8Gi"}}}))
    assert f"--quota-backend-bytes={4 * 1024**3}" in hc.container(custom.get("StatefulSet", ETCD), "etcd")["args"]
    # A quota the volume cannot hold (with room for the WAL and snapshots) is refused.
    for size in ("2Gi", "4Gi", "4294967296"):
        with pytest.raises(hc.RenderError, match=r"quotaBackendBytes .* is over 80% of etcd\.persistence\.size"):
            hc.render_text({"etcd": {"quotaBackendBytes": 4 * 1024**3, "persistence": {"size": size}}})


def test_network_policies_admit_the_charts_own_traffic(rendered: dict[str, Manifests]) -> None:
    m = rendered["optional"]
    policies = {p["metadata"]["name"]: p["spec"] for p in m.of_kind("NetworkPolicy")}
    assert set(policies) == {CP, NODE, ETCD}
    pods = {w["metadata"]["name"]: w for w in m.workloads()}
    labels = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in pods.items()}

    def admitted(policy: Doc, port: str, source: str) -> bool:
        return any(
            port in [p["port"] for p in rule["ports"]]
            and ("from" not in rule or any(hc.matches(peer.get("podSelector", {}).get("matchLabels", {}),
                                                      labels[source]) for peer in rule["from"]))
            for rule in policy["ingress"]
        )

    for policy in policies.values():
        (target,) = [w for w in pods if hc.matches(policy["podSelector"]["matchLabels"], labels[w])]
        named = {p["name"] for c in hc.containers(pods[target]) for p in c.get("ports", [])}
        assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} <= named
    assert admitted(policies[CP], "grpc", NODE) and admitted(policies[NODE], "grpc", CP)
    assert admitted(policies[NODE], "grpc", NODE)  # replication
    # The framed port carries the coordinator's Calls and the replicas' Replicate streams.
    assert admitted(policies[NODE], "frames", CP) and admitted(policies[NODE], "frames", NODE)
    node = hc.container(m.get("StatefulSet", NODE), "node")
    env = {e["name"]: e.get("value") for e in node["env"]}
    assert env["BLUEMARBLE_FRAMES_PORT"] == "7102" and {"name": "frames", "containerPort": 7102,
                                                        "protocol": "TCP"} in node["ports"]
    # The control plane's framed port (game servers' ExecuteTrades): the same number on the
    # Service, which is the host a game server dials it by.
    assert admitted(policies[CP], "frames", CP)
    cp = hc.container(m.get("Deployment", CP), "controlplane")
    assert {e["name"]: e.get("value") for e in cp["env"]}["BLUEMARBLE_FRAMES_PORT"] == "7002"
    service = m.get("Service", CP)
    assert {"name": "frames", "port": 7002, "targetPort": "frames", "protocol": "TCP"} in service["spec"]["ports"]
    assert admitted(policies[ETCD], "client", CP) and not admitted(policies[ETCD], "client", NODE)
    assert admitted(policies[ETCD], "peer", ETCD)
    # The backup CronJob's pods reach etcd's client port, and only that.
    backup_labels = m.get("CronJob", BACKUP)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    labels[BACKUP] = backup_labels
    assert admitted(policies[ETCD], "client", BACKUP) and not admitted(policies[ETCD], "peer", BACKUP)
    assert not any(hc.matches(p["podSelector"]["matchLabels"], backup_labels) for p in policies.values())


@pytest.mark.parametrize("variant", ["optional", "everything"])
def test_the_etcd_backup_runs_the_control_plane_backup_against_the_same_etcd(
    rendered: dict[str, Manifests], process_env: dict[str, set[str]], variant: str
) -> None:
    from controlplane.server.main import parse_args as controlplane_args

    m = rendered[variant]
    job = m.get("CronJob", BACKUP)["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and m.get("CronJob", BACKUP)["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = pod["containers"]
    assert c["command"] == ["bluemarble-controlplane"]
    settings, *_ = controlplane_args(c["args"])  # flags the process takes, values it accepts
    assert (settings.backup_dir, settings.backup_keep) == ("/backups", 24)
    env = hc.env_of(c)
    assert {n for n in env if n.startswith("BLUEMARBLE_")} <= process_env["controlplane"]
    cp = hc.env_of(hc.container(m.get("Deployment", CP), "controlplane"))
    etcd_env = {n for n in cp if n.startswith("BLUEMARBLE_ETCD") or n == "BLUEMARBLE_CLUSTER"}
    assert etcd_env <= set(env) and all(env[n] == cp[n] for n in etcd_env)  # the same etcd, as the same user
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes) and mounts["/backups"] == "backups"
    claim = volumes["backups"]["persistentVolumeClaim"]["claimName"]
    assert m.get("PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"] == "10Gi"
    # The backups outlive the release: helm uninstall (or backups turned off) keeps the claim.
    assert m.get("PersistentVolumeClaim", claim)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert c["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts
    if variant == "everything":  # external etcd with TLS: the same files, mounted from the same Secret
        ca = env["BLUEMARBLE_ETCD_CA"]["value"]
        assert mounts[ca.rsplit("/", 1)[0]] == "etcd-tls"
        assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client"
        assert env["BLUEMARBLE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "etcd-password"
    assert "CronJob" not in {d["kind"] for d in rendered["default"].docs}  # off unless asked for


# ---- NOTES.txt ---------------------------------------------------------------------------


def test_notes_show_grpcurl_through_a_port_forward() -> None:
    plain = hc.render_notes()
    assert f"kubectl -n {hc.NAMESPACE} port-forward svc/{CP} 7000:7000" in plain
    assert "grpcurl -plaintext localhost:7000 list" in plain
    tls = hc.render_notes(TLS)
    assert "-plaintext" not in tls and "grpcurl -cacert ca.crt -cert client.crt -key client.key" in tls
    assert f"-authority {CP}.{hc.NAMESPACE}.svc localhost:7000 list" in tls
    assert 'authorization: Bearer $TOKEN' in tls and "get secret bm-admin" in tls
    assert "(SetConfig, DrainNode, UndrainNode, ForcePromote)" in tls
    assert f"exec deploy/{CP} -- bluemarblectl --control-plane localhost:7000 status" in plain
    assert f"--control-plane {CP}.{hc.NAMESPACE}.svc:7000" in tls
    assert "--tls-ca /etc/bluemarble/tls/ca.crt status" in tls


# ---- the chart's scripts -----------------------------------------------------------------


def load_script(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"chart_{name}", hc.CHART / "files" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_topology_script_reads_the_zone_and_region_labels() -> None:
    topology = load_script("topology")
    node: Mapping[str, Any] = {"metadata": {"name": "k1", "labels": {
        "topology.kubernetes.io/zone": "eu-west-1a", "topology.kubernetes.io/region": "eu-west-1"}}}
    zone_label, region_label = "topology.kubernetes.io/zone", "topology.kubernetes.io/region"
    assert topology.labels_of(node, zone_label, region_label) == ("eu-west-1a", "eu-west-1")
    assert topology.labels_of({"metadata": {"name": "k2"}}, zone_label, region_label) == ("", "")


def test_health_probe_checks_the_advertised_name(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = load_script("health_probe")
    monkeypatch.setenv("BLUEMARBLE_ADVERTISE", f"{NODE}-0.{NODE}.{hc.NAMESPACE}.svc:7101")
    assert probe.server_name(["p", "127.0.0.1:7101"]) == f"{NODE}-0.{NODE}.{hc.NAMESPACE}.svc"
    assert probe.server_name(["p", "127.0.0.1:7000", "cp.game.svc"]) == "cp.game.svc"


def test_a_stopping_control_plane_replica_serves_on_while_its_endpoints_go(rendered: dict[str, Manifests]) -> None:
    container = hc.container(rendered["default"].get("Deployment", CP), "controlplane")
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    off = hc.render_text({"controlplane": {"preStopSleepSeconds": 0}},
                         show_only="templates/controlplane-deployment.yaml")
    assert "preStop" not in off

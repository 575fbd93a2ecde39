"""Renders helm/bluemarble for the chart's tests and reads the rendered manifests.

Why a module: the tests render several value sets and look documents up by kind and name
many times; rendering goes through `helm-template` (the Helm engine without the helm
binary, ../shared/tools/README.md), found next to the repository as CI's checkout has it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "bluemarble"
RELEASE = "bm"
NAMESPACE = "game"
KUBE_VERSION = "1.30.0"

Doc = dict[str, Any]


def helm_template_tool() -> Path | None:
    """The helm-template binary: $BLUEMARBLE_HELM_TEMPLATE, else ../shared/tools/helm-template
    beside the repository (as scripts/test.sh finds ../shared/tools); None when absent."""
    override = os.environ.get("BLUEMARBLE_HELM_TEMPLATE")
    candidates = [Path(override)] if override else []
    candidates.append(REPO.parent / "shared" / "tools" / "helm-template")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class RenderError(Exception):
    """helm-template refused the chart or the values (its stderr is the message)."""


def render_text(
    values: Mapping[str, Any] | None = None, chart: Path = CHART, show_only: str | None = None, release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> str:
    """The rendered manifests for values overriding values.yaml (passed as a -f file, as a
    user's values file is); raises RenderError when helm-template exits with status 1."""
    tool = helm_template_tool()
    assert tool is not None, "helm-template is absent (the tests skip before calling this)"
    argv = [str(tool), "--name", release, "--namespace", namespace, "--kube-version", f"v{KUBE_VERSION}"]
    if show_only:
        argv += ["--show-only", show_only]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        yaml.safe_dump(dict(values or {}), values_file)
        values_file.flush()
        done = subprocess.run(
            [*argv, "-f", values_file.name, str(chart)], capture_output=True, text=True, timeout=60, check=False
        )
    if done.returncode != 0:
        raise RenderError(done.stderr.strip())
    return done.stdout


def render_notes(values: Mapping[str, Any] | None = None) -> str:
    """NOTES.txt rendered with the values (helm-template, like `helm template`, skips NOTES.txt):
    a copy of the chart defines it as a template and renders it into a ConfigMap."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bluemarble"
        shutil.copytree(CHART, copy)
        notes = (copy / "templates" / "NOTES.txt").read_text()
        (copy / "templates" / "NOTES.txt").unlink()
        wrapped = '{{- define "notes-under-test" -}}' + notes + "{{- end -}}"
        (copy / "templates" / "_notes_under_test.tpl").write_text(wrapped)
        (copy / "templates" / "notes-under-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
            'data:\n  notes: {{ include "notes-under-test" . | toJson }}\n'
        )
        text = render_text(values, chart=copy, show_only="templates/notes-under-test.yaml")
    notes_text: str = yaml.safe_load(text)["data"]["notes"]
    return notes_text


@dataclass(frozen=True)
class Manifests:
    """The documents of one render, with look-ups by kind and name."""

    docs: tuple[Doc, ...]

    @classmethod
    def parse(cls, text: str) -> Manifests:
        return cls(tuple(d for d in yaml.safe_load_all(text) if d))

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> Doc:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} documents (have {self.names()})"
        return found[0]

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc, init: bool = True) -> list[Doc]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", []) if init else []) + list(spec["containers"])


def container(workload: Doc, name: str) -> Doc:
    found = [c for c in containers(workload) if c["name"] == name]
    assert len(found) == 1, f"container {name} in {workload['metadata']['name']}"
    return found[0]


def env_of(c: Doc) -> dict[str, Doc]:
    """A container's env entries by name (each entry: value or valueFrom)."""
    return {e["name"]: e for e in c.get("env", [])}


def env_value(c: Doc, name: str) -> str:
    entry = env_of(c).get(name)
    assert entry is not None and "value" in entry, f"{c['name']}: env {name} has no literal value ({entry})"
    value: str = entry["value"]
    return value


def port_named(c: Doc, name: str) -> int:
    found = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(found) == 1, f"{c['name']}: container port {name!r}: {c.get('ports')}"
    port: int = found[0]
    return port


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def walk(node: Any) -> Iterator[Any]:
    """Every value in a nested structure of dicts and lists, depth first."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> Doc:
    """base with override merged in, maps key by key (how helm combines values files)."""
    out: Doc = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def default_values() -> Doc:
    values: Doc = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def all_names(seq: Sequence[Doc]) -> list[str]:
    return [d["metadata"]["name"] for d in seq]

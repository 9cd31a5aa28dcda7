"""deploy/ parses, and every metric it names is one the worker really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from incstream.pipeline.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\bincstream_[a-z_]+")


def exported_names() -> set[str]:
    metrics = WorkerMetrics()
    metrics.consumer_lag.labels("0").set(0)
    metrics.dead_letters.labels("invalid_json")
    text = generate_latest(metrics.registry).decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced_names() -> set[str]:
    texts = [json.dumps(json.loads((DEPLOY / "grafana" / "incstream.json").read_text()))]
    texts.append((DEPLOY / "prometheus" / "rules.yml").read_text())
    return set(METRIC.findall("\n".join(texts)))


def test_yaml_files_parse():
    for path in DEPLOY.rglob("*.y*ml"):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(d is not None for d in documents), path


def test_every_referenced_metric_is_exported():
    referenced = referenced_names()
    assert referenced, "the dashboard and rules should name metrics"
    missing = referenced - exported_names()
    assert not missing, f"deploy/ names metrics the worker does not export: {sorted(missing)}"


def test_worker_settings_in_k8s_are_real_settings():
    from incstream.pipeline.settings import Settings

    manifest = list(yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text()))[0]
    env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    fields = {f"INCSTREAM_{name.upper()}" for name in Settings.model_fields}
    assert {item["name"] for item in env} <= fields


def test_worker_settings_in_compose_are_real_settings():
    from incstream.pipeline.settings import Settings

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    env = compose["services"]["worker"]["environment"]
    fields = {f"INCSTREAM_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields
    Settings(**{k.removeprefix("INCSTREAM_").lower(): v for k, v in env.items()})


def test_the_dashboard_shows_the_mac_reuse_ratio():
    dashboard = json.loads((DEPLOY / "grafana" / "incstream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("incstream_dense_equivalent_macs_total" in e and "incstream_inference_macs_total"
               in e and "/" in e for e in exprs)

"""deploy/ parses, every metric it names is one the worker really exports, and the deploy
files keep what makes them work: a broker address the worker container can reach, Grafana
provisioned, restart policies, probes on /live and /ready, non-root, the memory budget, a
volume for RocksDB, a private web port, a lean build context.

`docker compose config` and kubernetes-validate are not in CI (docs/operations.md says how to
run them); these checks are the cheap part that fails when the files regress.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from incstream.pipeline.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
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


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text())}


def worker_container() -> dict:
    return k8s_documents()["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]


def test_compose_broker_advertises_the_address_the_worker_uses():
    services = compose()["services"]
    entrypoint = services["broker"]["entrypoint"]
    advertised = entrypoint[entrypoint.index("--advertised-host") + 1]
    port = entrypoint[entrypoint.index("--port") + 1]
    assert advertised in services  # a compose service name: resolvable from the worker
    assert services["worker"]["environment"]["INCSTREAM_BROKER"] == f"kafka://{advertised}:{port}"
    assert services["worker"]["depends_on"]["broker"]["condition"] == "service_healthy"
    assert "healthcheck" in services["broker"]  # the image's /live check is the worker's


def test_compose_services_restart_and_publish_on_loopback_only():
    for name, service in compose()["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    services = compose()["services"]
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in services["grafana"]["volumes"])
    targets = {target: (DEPLOY / source).resolve() for source, target in mounts.items()}
    datasources = targets["/etc/grafana/provisioning/datasources"]
    [source] = yaml.safe_load((datasources / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    [provider] = yaml.safe_load((targets["/etc/grafana/provisioning/dashboards"]
                                 / "incstream.yml").read_text())["providers"]
    dashboard = [t for t in targets if t.startswith(provider["options"]["path"] + "/")]
    assert [targets[t].name for t in dashboard] == ["incstream.json"]
    assert targets[dashboard[0]].is_file()


def test_k8s_probes_use_live_and_ready():
    container = worker_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/live"


def test_k8s_runs_non_root():
    pod = k8s_documents()["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0 and pod["securityContext"]["fsGroup"]
    assert worker_container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_memory_comes_from_the_budget():
    from incstream.pipeline.settings import Settings

    container = worker_container()
    env = {item["name"]: item["value"] for item in container["env"]}
    budget = int(env["INCSTREAM_MEMORY_BUDGET_BYTES"])
    assert budget == Settings().memory_budget_bytes == 3 * 1024**3
    units = {"Gi": 1024**3, "Mi": 1024**2}

    def size(text: str) -> int:
        return int(text[:-2]) * units[text[-2:]]

    memory = container["resources"]
    # Requested what the worker keeps under; the limit leaves slack above it, not a multiple.
    assert size(memory["requests"]["memory"]) >= budget
    assert budget < size(memory["limits"]["memory"]) <= budget + 1024**3


def test_k8s_rocksdb_lives_on_a_persistent_volume():
    templates = k8s_documents()["StatefulSet"]["spec"]["volumeClaimTemplates"]
    claims = {claim["metadata"]["name"] for claim in templates}
    container = worker_container()
    data_dir = {i["name"]: i["value"] for i in container["env"]}["INCSTREAM_DATA_DIR"]
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == data_dir} & claims


def test_k8s_web_port_admits_only_prometheus():
    documents = k8s_documents()
    policy = documents["NetworkPolicy"]["spec"]
    labels = documents["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["from"] and all(source.get("podSelector") for source in rule["from"])
    port = worker_container()["ports"][0]
    assert [p["port"] for p in rule["ports"]] in ([port["name"]], [port["containerPort"]])
    annotations = documents["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_image_runs_non_root_with_a_healthcheck_on_live():
    lines = dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [check] = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert "/live" in check


def test_image_copies_every_package_folder():
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                  ["package-dir"].values())
    copied = {line.split()[1] for line in dockerfile() if line.startswith("COPY ")}
    assert folders <= copied


def test_build_context_leaves_out_venv_state_and_history():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".incstream", ".git", "benchmarks", "mutants"} <= ignored
    copied = {p for line in dockerfile() if line.startswith("COPY ") for p in line.split()[1:-1]}
    assert not copied & ignored


def test_prometheus_rules_path_is_relative_to_the_config():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rules in config["rule_files"]:
        assert not Path(rules).is_absolute() and (DEPLOY / "prometheus" / rules).is_file()


def test_the_runbook_and_deploy_readme_cover_every_alert():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule}
    for doc in (ROOT / "docs" / "operations.md", DEPLOY / "README.md"):
        lines = [line.strip() for line in doc.read_text().splitlines()]
        rows = {line.split("|")[1].split()[0].strip("`")
                for line in lines if line.startswith("| `Incstream")}
        assert rows == alerts, (doc.name, alerts ^ rows)

"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a real worker.

One worker (the default model) classifies part of the bundled edit stream while Prometheus
scrapes it every second and evaluates deploy/prometheus/rules.yml (a copy whose alerts wait
2 s instead of minutes: the expressions are the shipped ones). Then:
- every metric the worker exports, every recording rule and every Grafana panel query has data;
- the agent is made to hang on one event (INCSTREAM_TEST_STALL_AT) while 1,100 more arrive:
  every event sent is either finished or counted in the lag, /live turns 503 and
  IncstreamLagGrowing fires;
- SIGKILL: IncstreamWorkerDown and IncstreamWorkersAbsent fire.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kafka_tools import produce_raw
from prom import metric_by, samples
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import REPO, PrometheusServer, binary, rules_with_short_for

from incstream.pipeline.producer import read_events, replay
from incstream.pipeline.stream_files import select_events

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "deploy" / "grafana" / "incstream.json"
STALL_DOC = "prom-stall"
BACKLOG = 1100  # events sent while the agent hangs (IncstreamLagGrowing needs over 1000)


@pytest.fixture(scope="module")
def deployment(make_deployment, tmp_path_factory):
    if not (binary("prometheus") and binary("promtool")):
        pytest.skip("needs Debian's prometheus package (apt-get install prometheus; "
                    ".ci/run installs it)")
    return make_deployment(tmp_path_factory.mktemp("prometheus"))


@pytest.fixture(scope="module")
def worker(deployment):
    worker = deployment.worker(env={"INCSTREAM_TEST_STALL_AT": f"{STALL_DOC}:0",
                                    "INCSTREAM_LIVENESS_STALL_S": "3"}).start()
    worker.wait_ready()
    yield worker
    worker.kill()


@pytest.fixture(scope="module")
def prometheus(worker, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus-server")
    rules = rules_with_short_for("2s", root / "rules.yml")
    server = PrometheusServer(root, [f"127.0.0.1:{worker.web_port}"], rules).start()
    yield server
    server.stop()


def consumed(worker) -> float:
    return sum(metric_by(worker.scrape(), "incstream_events_total", "outcome").values())


def recording_rules() -> list[str]:
    import yaml

    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    return [rule["record"] for group in rules["groups"] for rule in group["rules"]
            if "record" in rule]


def panel_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_metric_rule_and_panel_has_data_under_load(deployment, worker, prometheus,
                                                         demo_stream: Path):
    s = deployment.settings
    # Scraped before the load, so that every counter's rise is seen (a rate needs two samples).
    prometheus.wait_for(lambda: prometheus.query('up{job="incstream"} == 1'), 30,
                        "Prometheus did not scrape the worker")
    events = select_events(read_events(demo_stream), docs=2, limit=24)
    replay(events, deployment.broker.bootstrap, s.edits_topic, progress=False)
    produce_raw(deployment.broker.bootstrap, s.edits_topic, [(b"prom-bad", b"{not json")])
    prometheus.wait_for(lambda: consumed(worker) == len(events) + 1, 180,
                        "the worker consumed the load")

    page = worker.scrape()
    exported = sorted({sample.name for family in text_string_to_metric_families(page)
                       for sample in family.samples})
    assert any(name.startswith("process_resident_memory") for name in exported)
    assert samples(page, "process_open_fds")

    def missing(queries: list[str]) -> list[str]:
        return [q for q in queries if not prometheus.query(q)]

    # Prometheus has the worker's every series, under its scrape job.
    series = [f'{{__name__="{name}", job="incstream"}}' for name in exported]
    prometheus.wait_for(lambda: not missing(series), 30, f"series missing: {missing(series)}")
    rules, panels = recording_rules(), panel_queries()
    assert len(rules) >= 8 and len(panels) >= 14
    prometheus.wait_for(lambda: not missing(rules), 30, f"rules without data: {missing(rules)}")
    prometheus.wait_for(lambda: not missing(panels), 30,
                        f"panels without data: {missing(panels)}")
    # The load shows in them (once a rule evaluation has followed the last scrape): events by
    # outcome, the dead letter's reason, MACs reused, the process's memory.
    for shows_load in ['incstream:events:rate1m{outcome="ok"} > 0',
                       'incstream:dead_letters:rate5m{reason="invalid_json"} > 0',
                       "incstream:mac_reuse_ratio:5m > 1",
                       'process_resident_memory_bytes{job="incstream"} > 100e6',
                       "incstream:workers_up:sum == 1"]:
        prometheus.wait_for(lambda q=shows_load: prometheus.query(q), 30, shows_load)
    quiet = set(prometheus.firing())
    assert not quiet & {"IncstreamWorkerDown", "IncstreamWorkersAbsent", "IncstreamLagGrowing",
                        "IncstreamStalled"}, quiet


def test_lag_alert_fires_on_a_real_backlog(deployment, worker, prometheus):
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    before = consumed(worker)
    stall = json.dumps({"schema": "doc-edit/v1", "doc_id": STALL_DOC, "rev": 0,
                        "snapshot": "The agent hangs on this one."}).encode()
    produce_raw(bootstrap, s.edits_topic, [(STALL_DOC.encode(), stall)])
    # One record a request: tansu's high-water mark is right only for single-record batches.
    produce_raw(bootstrap, s.edits_topic, [
        (f"prom-backlog-{i % 40}".encode(),
         json.dumps({"schema": "doc-edit/v1", "doc_id": f"prom-backlog-{i % 40}",
                     "rev": i // 40, "snapshot": f"Backlog event {i}."}).encode())
        for i in range(BACKLOG)])

    # Each event sent since is either finished (the agent may take a few from other
    # partitions before it meets the stalled one) or past its partition's committed offset:
    # the stalled one (read, never finished) and all behind it.
    def lag() -> float:
        return sum(metric_by(worker.scrape(), "incstream_consumer_lag_messages",
                             "partition").values())

    def accounted() -> tuple[float, float]:
        return consumed(worker) - before, lag()

    prometheus.wait_for(lambda: sum(accounted()) == BACKLOG + 1 and lag() > 1000, 60,
                        lambda: f"(finished, lag) = {accounted()}, sent {BACKLOG + 1}")
    finished, behind = accounted()
    assert behind > 1000 and finished < 50, (finished, behind)
    live = f"http://127.0.0.1:{worker.web_port}/live"
    prometheus.wait_for(lambda: status(live) == 503, 30, "/live did not turn 503")
    assert status(f"http://127.0.0.1:{worker.web_port}/ready") == 200

    firing = prometheus.wait_for(lambda: prometheus.firing().get("IncstreamLagGrowing"), 60,
                                 "IncstreamLagGrowing did not fire")
    assert float(firing[0]["value"]) == behind


def test_worker_down_alerts_fire_after_sigkill(worker, prometheus):
    worker.kill()
    firing = prometheus.wait_for(
        lambda: {"IncstreamWorkerDown", "IncstreamWorkersAbsent"} <= set(prometheus.firing())
        and prometheus.firing(), 60, "worker-down alerts did not fire")
    (down,) = firing["IncstreamWorkerDown"]
    assert down["labels"]["instance"] == f"127.0.0.1:{worker.web_port}"
    assert prometheus.query('up{job="incstream"} == 0')

"""The command line as a user runs it: --help, demo, produce."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kafka import KafkaConsumer

pytestmark = pytest.mark.integration


def incstream(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incstream.pipeline.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands():
    result = incstream("--help")
    assert result.returncode == 0
    for command in ("demo", "worker", "produce", "broker", "bench", "train", "train-dense",
                    "train-adapted", "eval", "classify"):
        assert f"  {command}" in result.stdout
    for command in ("demo", "worker", "produce", "broker", "bench"):
        assert incstream(command, "--help").returncode == 0


def test_demo_runs_end_to_end_and_verifies_itself():
    result = incstream("demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo OK" in result.stderr
    assert "144 (144 distinct revisions)" in result.stderr
    assert "polarity-minilm-vq64-stable" in result.stderr  # the default bundle, fast mode
    assert result.stderr.count("final label peps/") == 4  # one line per document
    # The compute saved against both peers: live (from the first answer on) and in the end.
    assert "compute so far: " in result.stderr and "chunk cache " in result.stderr
    for peer in ("chunk-cache peer", "full dense re-run"):
        line = next(x for x in result.stderr.splitlines() if f"MACs the {peer} would" in x)
        assert float(line.split("(")[1].split("x the engine")[0]) > 1, line


def test_demo_text_only_with_model_none():
    result = incstream("demo", "--quiet", "--model", "none", "--docs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo OK" in result.stderr and "none (text only)" in result.stderr
    assert "final label" not in result.stderr


def test_produce_replays_a_stream_keyed_by_doc_id(broker, hunks_stream):
    topic = "produce-cli-test"
    result = incstream("produce", str(hunks_stream), "--broker", broker.bootstrap,
                       "--topic", topic, "--docs", "2", "--rate", "2000")
    assert result.returncode == 0, result.stderr[-2000:]
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    keys = [m.key.decode() for m in consumer]
    consumer.close()
    assert len(keys) > 10 and len(set(keys)) == 2
    assert f"sent {len(keys)} events" in result.stderr


def test_the_broker_advertises_the_address_clients_can_reach():
    """Compose runs the broker on 0.0.0.0; clients must be told a name they can connect to,
    not 0.0.0.0 (a worker container would then connect to itself)."""
    from kafka import KafkaAdminClient

    from incstream.pipeline.broker import EmbeddedBroker

    with EmbeddedBroker(host="0.0.0.0", advertised_host="localhost") as running:
        assert running.bootstrap.startswith("localhost:")
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{running.port}")
        try:
            brokers = admin.describe_cluster()["brokers"]
        finally:
            admin.close()
    assert [(b["host"], b["port"]) for b in brokers] == [("localhost", running.port)]

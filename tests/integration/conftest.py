"""Integration fixtures: a real tansu broker, real worker processes, real RocksDB."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.broker import EmbeddedBroker
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from pipeline.worker_process import WorkerProcess

REPO = Path(__file__).resolve().parents[2]
SHARED_HUNKS = REPO.parent / "shared" / "data" / "edits" / "peps-hunks.jsonl.gz"
BUNDLED = REPO / "pipeline" / "data" / "demo-edits.jsonl.gz"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running


@pytest.fixture(scope="session")
def hunks_stream() -> Path:
    """Real PEP edit history: ../shared when it is there, else the slice bundled in the repo."""
    return SHARED_HUNKS if SHARED_HUNKS.exists() else BUNDLED


@dataclass
class Deployment:
    """One isolated worker deployment on the shared broker: its own group, topics, data dir."""

    broker: EmbeddedBroker
    settings: Settings
    root: Path

    def worker(self, data_dir: Path | None = None, name: str = "worker") -> WorkerProcess:
        s = self.settings
        return WorkerProcess(
            broker_url=self.broker.url,
            data_dir=data_dir or self.root / name,
            partitions=s.partitions,
            log_path=self.root / f"{name}.log",
            app_id=s.app_id,
            extra_args=["--edits-topic", s.edits_topic, "--classes-topic", s.classes_topic,
                        "--dlq-topic", s.dlq_topic],
        )


def new_deployment(broker: EmbeddedBroker, root: Path) -> Deployment:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        broker=broker.url,
        app_id=f"incstream-{tag}",
        edits_topic=f"edits-{tag}",
        classes_topic=f"classes-{tag}",
        dlq_topic=f"dlq-{tag}",
        partitions=4,
    )
    ensure_topics(settings)
    return Deployment(broker, settings, root)


@pytest.fixture(scope="session")
def make_deployment(broker: EmbeddedBroker):
    """A factory: make_deployment(root) -> a fresh isolated Deployment on the shared broker."""
    return lambda root: new_deployment(broker, root)

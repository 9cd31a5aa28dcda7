"""Integration fixtures: a real tansu broker, real worker processes, real RocksDB."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from answers import FreshAnswer

from incstream.pipeline.broker import EmbeddedBroker
from incstream.pipeline.settings import Settings
from incstream.pipeline.topics import ensure_topics
from incstream.pipeline.worker_process import WorkerProcess

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


@pytest.fixture(scope="session")
def demo_stream() -> Path:
    """The bundled real edit stream (4 PEP histories, 144 events, ~300-700 tokens each): small
    enough to classify every revision with the model on a 2-core CI machine."""
    return BUNDLED


@dataclass
class Deployment:
    """One isolated worker deployment on the shared broker: its own group, topics, data dir."""

    broker: EmbeddedBroker
    settings: Settings
    root: Path

    def worker(self, data_dir: Path | None = None, name: str = "worker",
               model: str | None = None, session_cache_bytes: int | None = None,
               env: dict[str, str] | None = None, args: list[str] | None = None,
               ) -> WorkerProcess:
        """A worker process; `model` None = the default bundle, "none" = text only; `env`:
        INCSTREAM_* settings (and test hooks) for it alone; `args`: more CLI options.

        Exact engine mode unless `env` names one: most tests check a worker's answers against
        a fresh build of the same text (fresh_classify), which only exact mode equals. The
        default bundle's own choice, fast, is tested where a test asks for it."""
        s = self.settings
        extra = ["--edits-topic", s.edits_topic, "--classes-topic", s.classes_topic,
                 "--dlq-topic", s.dlq_topic, "--torch-threads", "1", *(args or [])]
        if model is not None:
            extra += ["--model", model]
        if session_cache_bytes is not None:
            extra += ["--session-cache-bytes", str(session_cache_bytes)]
        return WorkerProcess(
            broker_url=self.broker.url,
            data_dir=data_dir or self.root / name,
            partitions=s.partitions,
            log_path=self.root / f"{name}.log",
            app_id=s.app_id,
            extra_args=extra,
            env={"INCSTREAM_ENGINE_MODE": "exact", **(env or {})},
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


@pytest.fixture(scope="session")
def fresh_session() -> Callable[[str], object]:
    """A fresh DocumentSession of the default bundle on a text, built in this process
    (1 torch thread): what a worker's cache miss builds."""
    import torch

    from incstream.engine.incremental.chunks import ChunkPolicy
    from incstream.engine.incremental.session import DocumentSession
    from incstream.engine.model.base_model import load_tokenizer
    from incstream.engine.model.model_bundle import DEFAULT_MODEL, load_model_bundle

    torch.set_num_threads(1)
    model, manifest = load_model_bundle(DEFAULT_MODEL, device="cpu", with_original=False)
    tokenizer = load_tokenizer(manifest["base_model"])
    policy = ChunkPolicy(max_tokens=manifest["chunking"]["chunk_tokens"])

    def build(text: str) -> DocumentSession:
        with torch.no_grad():
            return DocumentSession(model, tokenizer, text, policy)

    build.labels = list(model.head.labels)  # type: ignore[attr-defined]
    build.model_name = manifest["name"]  # type: ignore[attr-defined]
    return build


@pytest.fixture(scope="session")
def fresh_classify(fresh_session) -> Callable[[str], FreshAnswer]:
    """Classify a text from scratch in this process (a fresh DocumentSession of the default
    bundle): what a worker's answer for that text must equal."""
    import torch

    labels = fresh_session.labels

    def classify(text: str) -> FreshAnswer:
        with torch.no_grad():
            logits = fresh_session(text).logits()
        probs = torch.softmax(logits, dim=-1).tolist()
        best = max(range(len(labels)), key=lambda i: float(logits[i]))
        return FreshAnswer(labels[best], dict(zip(labels, probs, strict=True)),
                           fresh_session.model_name)

    return classify


@pytest.fixture(scope="module")
def deployment(make_deployment, tmp_path_factory, request):
    """One deployment (its own topics, group and table) shared by a test module's tests."""
    return make_deployment(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def reader(deployment):
    """A reader of the module deployment's update and dead-letter topics."""
    from incstream.pipeline.topic_reader import TopicReader

    s = deployment.settings
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic, s.dlq_topic]).start()
    yield reader
    reader.stop()


"""All worker configuration in one place; every field can be set as INCSTREAM_<NAME>.

CLI options override the environment, which overrides these defaults.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from incstream.paths import worker_dir

# engine.model.model_bundle.DEFAULT_MODEL, spelled here so that reading the settings (and a
# CLI's --help) does not import torch; tests/test_document_sessions.py keeps the two equal.
DEFAULT_MODEL_NAME = "polarity-minilm-vq64-stable"

ENV_PREFIX = "INCSTREAM_"
# INCSTREAM_* variables that are not settings but are read elsewhere; everything else with the
# prefix must name a setting (check_environment), so that a misspelt one is not ignored.
OTHER_VARIABLES = frozenset({
    "INCSTREAM_HOME",  # the user data directory (datasets, trained bundles), when set
    "INCSTREAM_DATASETS_DIR",  # engine/training/dataset_sources.py: the labelled data cache
    "INCSTREAM_FETCH_DATASETS",  # tests/test_datasets.py: fetch missing data first
    "INCSTREAM_NO_SKIPS",  # tests/conftest.py: a skipped test fails (as CI=true)
    "INCSTREAM_TEST_PROCESSES",  # ./dev test: pytest-xdist processes (2; 0 = one process)
    # pipeline/app.py's fault hooks, armed by the integration tests only.
    "INCSTREAM_TEST_CRASH_AFTER_PUBLISH",
    "INCSTREAM_TEST_FAIL_BEFORE_PUBLISH",
    "INCSTREAM_TEST_STALL_AT",
})


BATCH_EVENTS = 16  # the agent's batch where batching cannot change an answer (batch_events)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Where Kafka is. Faust form; a bare HOST:PORT is accepted too.
    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "incstream"
    edits_topic: str = "doc-edits"
    classes_topic: str = "doc-classes"
    dlq_topic: str = "doc-edits-dlq"
    table_name: str = "documents"
    # Fast mode's per-chunk activation records (codes and position ids; exact mode keeps none).
    activations_table: str = "activations"
    # Partitions of the input topic; the table's changelog gets as many (Faust insists).
    partitions: int = 4
    replication_factor: int = 1  # raise it on a real cluster
    # Local RocksDB lives here; two workers on one machine need two directories. Default:
    # <data home>/worker (incstream/paths.py: $INCSTREAM_HOME or the user data directory).
    data_dir: Path = Field(default_factory=worker_dir)
    web_host: str = "127.0.0.1"
    web_port: int = 6066  # /metrics, /live and /ready: nothing else
    # /live turns 503 when the agent holds one event longer than this, or takes none for
    # this long while events wait (a stuck agent; the supervisor restarts the worker).
    liveness_stall_s: float = 180.0
    # Events held per document while waiting for a missing revision.
    max_held_per_doc: int = 256
    # A document's encoded state must fit in one changelog record (Kafka's default is 1 MB).
    max_state_bytes: int = 900_000
    # Events larger than this are dead-lettered unparsed (event_too_large), with an excerpt.
    # Kafka's default record limit is 1 MB, so producers rarely get past it anyway.
    max_event_bytes: int = 1_048_576
    # Read every local table store through at start (RocksDB checksums) and move a damaged
    # one aside to be rebuilt from the changelog. Costs a scan of the local state.
    verify_store_at_start: bool = True
    # The worker asks the broker every broker_probe_interval_s whether it answers and has the
    # worker's topics (pipeline/broker_watch.py); while not, /ready is 503, and after
    # broker_lost_exit_s the worker exits with status 69 for its supervisor to restart it
    # (0 = never exit).
    broker_probe_interval_s: float = 5.0
    broker_lost_exit_s: float = 60.0
    # Largest batch of records the worker's producer sends to one partition, in bytes; the
    # first record of a batch always fits, so 1 sends every record in a batch of its own.
    # tansu 0.6.0 (the embedded broker) reports a partition's high-water mark as its last
    # batch's base offset + 1: when that batch holds several records (two events' table
    # writes sent together, as a batched step does), a changelog looks shorter than the
    # offsets the worker persisted, and Faust's recovery at the next rebalance stops the
    # worker (ConsistencyError). On a real Kafka cluster raise it (Kafka's default: 16384).
    producer_max_batch_bytes: int = 1
    # Faust commits consumer offsets this often (seconds); at-least-once either way.
    commit_interval_s: float = 1.0
    # How long the group waits for a silent (crashed) member before handing its partitions
    # on. Kafka's own default is 45 s; a crashed worker's documents would wait that long.
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 2.0
    log_level: str = "info"
    # "json": one JSON object a line on stderr (time, level, logger, message, exception) for a
    # log pipeline; "text": Faust's coloured lines (pipeline/log_format.py).
    log_format: Literal["text", "json"] = "text"
    # The classifier: a model bundle name (engine/bundles/) or directory; "none" runs text
    # only (label and scores null). The default is engine.model.model_bundle.DEFAULT_MODEL.
    model: str = DEFAULT_MODEL_NAME
    # Who answers: "incremental" (the engine's sessions) or, to measure against, a peer that
    # runs the dense model: "chunk" (re-runs changed chunks) or "dense" (the whole document).
    classifier: Literal["incremental", "chunk", "dense"] = "incremental"
    # Resident memory (RSS) the worker process may hold, model and sessions included
    # (pipeline/memory_budget.py). The hot sessions get what it leaves over the memory measured
    # once the model is loaded and the reserve, at most session_cache_bytes. 0: no budget, the
    # sessions get session_cache_bytes. (The incremental classifier's; the peers ignore it.)
    memory_budget_bytes: int = 3 * 1024**3
    # Kept free inside the budget for what grows after start: a chunk build's activations,
    # Kafka fetch buffers, RocksDB memtables, the allocator's slack.
    memory_reserve_bytes: int = 512 * 1024**2
    # At most this much for the hot cache of per-document sessions (activations: exact ~117 KB
    # a token, fast ~15 KB; least recently used documents are evicted and rebuilt from their
    # text when next edited).
    session_cache_bytes: int = 2 * 1024**3
    # Documents with more tokens than this (or than one session can hold within the sessions'
    # budget) are not classified: the revision is applied to the text, its update has label
    # null and a document_too_large dead letter says why. 0: only the budget limits them.
    max_document_tokens: int = 16_384
    # The agent takes what is pending, up to batch_max_events events, waiting at most
    # batch_wait_s for more once it has one, and updates the documents among them in one
    # batched engine step (pipeline/event_batches.py; a document's own events still go one
    # after the other). Unset: BATCH_EVENTS where a batched step answers every document as it
    # would alone (the incremental classifier in exact mode, or in fast mode on the float16
    # kernels: engine/incremental/fast_chunk.py, _shared_calls), else 1, one event at a time
    # (elsewhere a batched step's float rounding can flip a fast-mode code near its margin, so
    # an answer could depend on which documents shared its step).
    batch_max_events: int | None = None
    batch_wait_s: float = 0.005
    # torch CPU threads for inference (one inference thread per worker process).
    torch_threads: int = 1
    # Engine mode: "exact" (every answer equals a fresh build of the text) or "fast" (reuse
    # inside the edited chunk, a measured divergence; engine/incremental/fast_mode.py). Unset:
    # the model
    # bundle's choice, else exact. The fast dial's settings override the bundle's / defaults.
    engine_mode: str | None = None
    fast_tau: float | None = None
    fast_context_tolerance: float | None = None
    fast_refresh_edits: int | None = None
    fast_refresh_displacement: int | None = None
    # rebuild the drifted chunks when the answer's top two probabilities are this close
    fast_refresh_margin: float | None = None
    # "float32", "bfloat16", "float16" or "int8" (CPU only) or "auto"; unset: the bundle's,
    # else auto = bfloat16 where the hardware runs it natively (CUDA; CPUs with AVX512-BF16 or
    # AMX), else float16 where its kernel compiles, else float32
    fast_matmul: str | None = None
    # "auto" (compiled CPU kernels for the fast mode's held attention and, with float16
    # matrices, the rest of each block, where a C compiler builds them:
    # engine/incremental/held_attention.py, engine/model/half_linear.py), "fused" (that, or an
    # error), "torch" (the PyTorch references); unset: the bundle's, else auto
    fast_kernel: str | None = None

    def engine(self, bundle_engine: dict | None = None):
        """The engine mode to run: "exact" or an engine.incremental.fast_mode.FastModeConfig."""
        from incstream.engine.incremental.fast_mode import resolve_mode

        return resolve_mode(bundle_engine, self.engine_mode, tau=self.fast_tau,
                            context_tolerance=self.fast_context_tolerance,
                            refresh_edits=self.fast_refresh_edits,
                            refresh_displacement=self.fast_refresh_displacement,
                            refresh_margin=self.fast_refresh_margin,
                            matmul=self.fast_matmul, kernel=self.fast_kernel)

    def batch_events(self, classifier: object | None) -> int:
        """Events the agent takes at once: batch_max_events, else BATCH_EVENTS where the
        classifier's batched steps answer each document as alone, else 1."""
        if self.batch_max_events is not None:
            return self.batch_max_events
        return BATCH_EVENTS if getattr(classifier, "batches_alone_exact", False) else 1

    @property
    def model_enabled(self) -> bool:
        return self.model.strip().lower() not in ("", "none")

    @property
    def bootstrap(self) -> str:
        """HOST:PORT[,HOST:PORT] for kafka-python clients."""
        return ",".join(
            part.split("://", 1)[-1] for part in self.broker.replace(";", ",").split(",")
        )

    @property
    def faust_broker(self) -> str:
        return self.broker if "://" in self.broker else f"kafka://{self.broker}"


class UnknownVariablesError(ValueError):
    """INCSTREAM_* environment variables that name no setting (a typo would be ignored)."""


def known_variables() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise UnknownVariablesError naming every INCSTREAM_* variable that is neither a setting
    nor in OTHER_VARIABLES, each with the closest known name. Names compare upper-cased, as
    pydantic-settings reads them."""
    environ = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(name for name in environ
                     if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)
    if not unknown:
        return
    # Compared without the prefix, which every name shares and would make anything look close.
    suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)
    described = []
    for name in unknown:
        closest = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), suffixes,
                                            n=1, cutoff=0.6)
        described.append(f"{name} (did you mean {ENV_PREFIX}{closest[0]}?)" if closest else name)
    plural = len(unknown) > 1
    raise UnknownVariablesError(
        f"unknown environment variable{'s' if plural else ''}: {', '.join(described)}. "
        "Settings are INCSTREAM_<NAME> for the fields of pipeline/settings.py (README, "
        f"Configuration); rename or unset {'them' if plural else 'it'}.")

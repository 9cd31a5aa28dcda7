"""The `incstream` command line: demo, worker, produce, broker (and bench)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from incstream.pipeline.settings import Settings, UnknownVariablesError, check_environment


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment (INCSTREAM_*), with the CLI's non-empty options on top."""
    return Settings(**{name: value for name, value in overrides.items() if value is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """incstream: keep a document classifier's answer current while documents are edited.

    Every option also reads an INCSTREAM_<NAME> environment variable (e.g. INCSTREAM_BROKER);
    an INCSTREAM_* variable that names no setting is an error, not ignored.
    """
    try:
        check_environment()
    except UnknownVariablesError as error:
        raise click.ClickException(str(error)) from None


@cli.command()
@click.option("--broker", help="Kafka bootstrap, e.g. kafka://127.0.0.1:9092 [INCSTREAM_BROKER]")
@click.option("--partitions", type=int, help="partitions of the edits topic (default 4)")
@click.option("--data-dir", type=click.Path(path_type=Path), help="local RocksDB directory")
@click.option("--web-host", help="address the web port binds (default 127.0.0.1; 0.0.0.0 in a "
              "container) [INCSTREAM_WEB_HOST]")
@click.option("--web-port", type=int, help="HTTP port for /metrics, /live, /ready (default 6066)")
@click.option("--app-id", help="Faust app id = consumer group (default incstream)")
@click.option("--edits-topic", help="input topic (default doc-edits)")
@click.option("--classes-topic", help="output topic (default doc-classes)")
@click.option("--dlq-topic", help="dead-letter topic (default doc-edits-dlq)")
@click.option("--max-held-per-doc", type=int, help="events held per document across a gap")
@click.option("--model", help="model bundle name or directory, or none for text only "
              "(default polarity-minilm-vq64-stable) [INCSTREAM_MODEL]")
@click.option("--classifier", type=click.Choice(["incremental", "chunk", "dense"]),
              help="incremental (default), or a dense peer to measure against: chunk (re-runs "
                   "changed chunks) or dense (the whole document) [INCSTREAM_CLASSIFIER]")
@click.option("--session-cache-bytes", type=int,
              help="at most this much for the hot session cache (default 2 GiB)")
@click.option("--memory-budget-bytes", type=int,
              help="resident memory the worker may hold, model and sessions included "
                   "(default 3 GiB; 0 = none) [INCSTREAM_MEMORY_BUDGET_BYTES]")
@click.option("--max-document-tokens", type=int,
              help="larger documents are not classified (document_too_large; default 16384)")
@click.option("--torch-threads", type=int, help="torch CPU threads for inference (default 1)")
@click.option("--mode", "engine_mode", type=click.Choice(["exact", "fast"]),
              help="engine mode (default: the bundle's, else exact) [INCSTREAM_ENGINE_MODE]")
@click.option("--tau", "fast_tau", type=float,
              help="fast mode: code hysteresis x the median code gap [INCSTREAM_FAST_TAU]")
@click.option("--context-tolerance", "fast_context_tolerance", type=float,
              help="fast mode: context drift held without recompute, x the median code gap")
@click.option("--refresh-edits", "fast_refresh_edits", type=int,
              help="fast mode: rebuild a chunk canonically after N updates (0 = never)")
@click.option("--refresh-displacement", "fast_refresh_displacement", type=int,
              help="fast mode: rebuild a chunk when a row's id is this far from canonical")
@click.option("--refresh-margin", "fast_refresh_margin", type=float,
              help="fast mode: rebuild the drifted chunks when the answer's top two class "
                   "probabilities are closer than this (0 = never) "
                   "[INCSTREAM_FAST_REFRESH_MARGIN]")
@click.option("--matmul", "fast_matmul",
              type=click.Choice(["float32", "bfloat16", "float16", "int8", "auto"]),
              help="fast mode: how the linear layers multiply (float16 / int8: float16 / int8 "
                   "weights, CPU only); auto (default): bfloat16 where the hardware runs it "
                   "natively, else float16 where its kernel compiles, else float32 "
                   "[INCSTREAM_FAST_MATMUL]")
@click.option("--kernel", "fast_kernel", type=click.Choice(["auto", "fused", "torch"]),
              help="fast mode: held attention as the compiled CPU kernel (fused) or in "
                   "PyTorch; auto (default): fused where a C compiler builds it "
                   "[INCSTREAM_FAST_KERNEL]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="text (default) or json: one JSON object a line [INCSTREAM_LOG_FORMAT]")
def worker(**options: Any) -> None:
    """Run a stream worker: doc-edits in, doc-classes out, state in RocksDB.

    Stops cleanly on SIGTERM or Ctrl-C.
    """
    from incstream.pipeline.app import run_worker

    run_worker(settings_from(**options))


@cli.command()
@click.argument("stream", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--broker", help="Kafka bootstrap [INCSTREAM_BROKER]")
@click.option("--topic", help="topic to write to (default: the edits topic, doc-edits)")
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="events per second; 0 = as fast as the broker takes them")
@click.option("--docs", type=int, default=None, help="only the first N documents of the stream")
@click.option("--limit", type=int, default=None, help="stop after N events")
@click.option("--create-topics/--no-create-topics", default=True, show_default=True,
              help="create the worker's topics first if they are missing")
def produce(
    stream: Path, broker: str | None, topic: str | None, rate: float, docs: int | None,
    limit: int | None, create_topics: bool,
) -> None:
    """Replay a doc-edit/v1 stream (.jsonl or .jsonl.gz) into Kafka, keyed by doc_id."""
    import time

    from incstream.pipeline.producer import read_events, replay
    from incstream.pipeline.stream_files import select_events
    from incstream.pipeline.topics import ensure_topics

    settings = settings_from(broker=broker)
    if create_topics:
        ensure_topics(settings)
    events = select_events(read_events(stream), docs=docs, limit=limit)
    started = time.monotonic()
    sent = replay(events, settings.bootstrap, topic or settings.edits_topic, rate=rate,
                  total=len(events))
    elapsed = time.monotonic() - started
    click.echo(f"sent {sent} events in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):.0f} ev/s)",
               err=True)


@cli.command()
@click.option("--port", type=int, default=9092, show_default=True, help="0 = any free port")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--advertised-host", default=None,
              help="address clients are told to connect to (default: --host); in a container "
                   "that listens on 0.0.0.0, a name the clients resolve, e.g. compose's service")
def broker(port: int, host: str, advertised_host: str | None) -> None:
    """Run the embedded Kafka-compatible broker (tansu, in memory) until Ctrl-C/SIGTERM."""
    from incstream.pipeline.broker import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(host=host, port=port, advertised_host=advertised_host) as running:
        click.echo(f"broker ready: {running.url} (kafka-python bootstrap {running.bootstrap})")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        click.echo("stopping broker", err=True)


@cli.command()
@click.option("--stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="doc-edit/v1 stream to replay (default: the bundled one)")
@click.option("--docs", type=int, default=None, help="only the first N documents")
@click.option("--limit", type=int, default=None, help="only the first N events")
@click.option("--rate", type=float, default=0.0, help="events per second (0 = unlimited)")
@click.option("--quiet", is_flag=True, help="print the summary only, not every update")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="give up waiting for updates after this many seconds")
@click.option("--model", default=None,
              help="model bundle name or directory, or none for text only "
                   "[default: INCSTREAM_MODEL, else polarity-minilm-vq64-stable]")
def demo(stream: Path | None, docs: int | None, limit: int | None, rate: float, quiet: bool,
         timeout: float, model: str | None) -> None:
    """Start a local broker and a worker, replay an edit stream, show the updates, stop."""
    from incstream.pipeline.demo import run_demo

    ok = run_demo(stream=stream, docs=docs, limit=limit, rate=rate, quiet=quiet,
                  timeout_s=timeout, model=model)
    sys.exit(0 if ok else 1)


def _register_subcommands() -> None:
    from incstream.pipeline.cli_bench import bench
    from incstream.pipeline.cli_model import (
        classify_command,
        eval_command,
        train_adapted_command,
        train_command,
        train_dense_command,
    )
    from incstream.pipeline.memory_bench import memory_bench_command
    from incstream.pipeline.pipeline_modes import pipeline_bench_command

    bench.add_command(pipeline_bench_command)
    bench.add_command(memory_bench_command)
    cli.add_command(bench)
    cli.add_command(train_command, "train")
    cli.add_command(train_dense_command, "train-dense")
    cli.add_command(train_adapted_command, "train-adapted")
    cli.add_command(eval_command, "eval")
    cli.add_command(classify_command, "classify")


_register_subcommands()


def main() -> None:
    cli(prog_name="incstream")


if __name__ == "__main__":
    main()

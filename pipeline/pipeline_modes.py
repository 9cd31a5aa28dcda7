"""`incstream bench pipeline`: the incremental worker against workers running the dense peers,
in one invocation, on the same replay.

Each mode gets a fresh embedded broker and one real worker process (pipeline.pipeline_bench
runs one), differing only in the worker's classifier (`incstream worker --classifier`,
pipeline.peer_classifiers):

  incremental  the engine's sessions (engine mode from the usual settings, or --engine-mode)
  chunk        the chunk-cache peer: dense float32 MiniLM re-run on the chunks whose token ids
               changed, one pooled vector per chunk
  dense        the full dense re-run of the whole document at every revision
  text         no model at all (`--model none`): the pipeline's own cost

Per mode: edits/s, end-to-end latency p50/p99 (handed to the producer -> answer received),
lost revisions (a run with any fails the command: exit 1), duplicate updates, MACs spent (the
worker's /metrics), state bytes per document (durable: the table's changelog; hot: the
classifier's cache at the end), changelog bytes per edit. Labels are compared per revision
between modes (chunk and dense run the same dense model on the same chunks: equal answers).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from incstream.pipeline.pipeline_bench import Revision, failure_lines, run_pipeline_bench

MODES = ("incremental", "chunk", "dense")
TEXT_ONLY = "text"


def worker_args(mode: str, engine_mode: str | None = None,
                session_cache_bytes: int | None = None) -> list[str]:
    """`incstream worker` options of a mode."""
    if mode == TEXT_ONLY:
        return ["--model", "none"]
    if mode not in MODES:
        raise click.BadParameter(f"unknown mode {mode!r}; one of "
                                 f"{', '.join((*MODES, TEXT_ONLY))}")
    args = ["--classifier", mode]
    if mode == "incremental" and engine_mode:
        args += ["--mode", engine_mode]
    if session_cache_bytes:
        args += ["--session-cache-bytes", str(session_cache_bytes)]
    return args


def _per(total: float | None, n: int) -> float | None:
    return total / n if total is not None and n else None


def mode_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one mode's run (its full result stays under `run`)."""
    counters, changelog = run["worker_counters"], run["changelog"]
    e2e = run["end_to_end_latency_s"] or {}
    processing = run["processing_latency_ms"] or {}
    macs = counters.get("macs_spent")
    return {
        "edits_per_s": run["events_per_s"],
        "latency_p50_s": e2e.get("median"),
        "latency_p99_s": e2e.get("p99"),
        "processing_ms_p50": processing.get("median"),
        "processing_ms_p99": processing.get("p99"),
        "lost": run["lost"],
        "duplicates": run["duplicate_updates"],
        "macs": macs,
        "macs_per_edit": _per(macs, run["answered"]),
        "macs_dense_equivalent": counters.get("macs_dense_equivalent"),
        "macs_chunk_cache_equivalent": counters.get("macs_chunk_cache_equivalent"),
        "state_bytes_per_doc": {
            "durable": changelog.get("durable_bytes_per_doc"),
            "hot": _per(counters.get("session_cache_bytes_at_end"), run["docs"]),
        },
        "changelog_bytes_per_edit": changelog.get("bytes_per_edit"),
        "changelog_record_bytes_median": changelog.get("record_bytes_median"),
        "answers_by_cache": run["answers_by_cache"],
        "run": run,
    }


def label_agreement(answers: dict[str, dict[Revision, dict[str, Any]]]) -> dict[str, Any]:
    """Per pair of modes with a model: how many revisions got the same label, and the largest
    difference of a class probability."""
    out = {}
    for a, b in combinations([m for m in answers if m != TEXT_ONLY], 2):
        both = [(answers[a][k], answers[b][k]) for k in answers[a] if k in answers[b]]
        same = sum(1 for x, y in both if x["label"] == y["label"])
        diffs = [abs(x["scores"][c] - y["scores"].get(c, float("nan"))) for x, y in both
                 for c in x["scores"]]
        out[f"{a}_vs_{b}"] = {"revisions": len(both), "labels_equal": same,
                              "labels_equal_fraction": same / len(both) if both else None,
                              "max_abs_prob_diff": max(diffs, default=None)}
    return out


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def comparison(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The incremental mode against each peer run: edits/s, p99 latency and MACs, as ratios."""
    base = modes.get("incremental")
    if base is None:
        return {}
    return {peer: {"edits_per_s_incremental_over_peer":
                   _ratio(base["edits_per_s"], modes[peer]["edits_per_s"]),
                   "latency_p99_peer_over_incremental":
                   _ratio(modes[peer]["latency_p99_s"], base["latency_p99_s"]),
                   "macs_peer_over_incremental": _ratio(modes[peer]["macs"], base["macs"])}
            for peer in modes if peer in ("chunk", "dense")}


def run_modes(stream: Path, modes: list[str], docs: int | None, limit: int | None,
              partitions: int, timeout_s: float, model: str | None = None,
              engine_mode: str | None = None, session_cache_bytes: int | None = None,
              rate: float = 0.0, progress=None) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, dict[Revision, dict[str, Any]]] = {}
    for mode in modes:
        if progress:
            progress(mode)
        answers[mode] = {}
        run = run_pipeline_bench(stream, docs, limit, partitions, timeout_s,
                                 model=None if mode == TEXT_ONLY else model,
                                 worker_args=worker_args(mode, engine_mode, session_cache_bytes),
                                 rate=rate, answers=answers[mode])
        results[mode] = mode_figures(run)
    first = next(iter(results.values()))["run"]
    failed = {m: r["run"]["failure"] for m, r in results.items() if not r["run"]["complete"]}
    return {
        "bench": "pipeline",
        "stream": str(stream),
        "events": first["events"],
        "docs": first["docs"],
        "partitions": partitions,
        "rate": rate or "backlog (as fast as the producer goes)",
        "engine_mode": engine_mode or "the worker's default (INCSTREAM_ENGINE_MODE, the "
                                      "bundle's, else exact)",
        "complete": not failed,
        "failure": "; ".join(f"{m}: {why}" for m, why in failed.items()) or None,
        "lost": sum(r["lost"] for r in results.values()),
        "modes": results,
        "comparison": comparison(results),
        "labels": label_agreement(answers),
        "device": first["device"],
        "method": "each mode: a fresh embedded broker, one worker process made ready first, "
                  "the same replay; edits_per_s = revisions answered / (last answer - first "
                  "event sent); latency = answer received - event handed to the producer; "
                  "MACs from the worker's /metrics; durable bytes from the changelog topics "
                  "read back after the worker stopped; hot bytes = the classifier's cache at "
                  "the end / documents",
    }


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def render_table(result: dict[str, Any]) -> Table:
    modes = result["modes"]
    table = Table(title=f"incstream bench pipeline: {result['events']} events, "
                        f"{result['docs']} documents")
    table.add_column("measure")
    for mode in modes:
        table.add_column(mode, justify="right")
    rows = [
        ("edits/s", lambda m: _fmt(m["edits_per_s"], ".1f")),
        ("latency p50 / p99 s", lambda m: f"{_fmt(m['latency_p50_s'], '.2f')} / "
                                          f"{_fmt(m['latency_p99_s'], '.2f')}"),
        ("processing p50 / p99 ms", lambda m: f"{_fmt(m['processing_ms_p50'], '.1f')} / "
                                              f"{_fmt(m['processing_ms_p99'], '.1f')}"),
        ("lost / duplicates", lambda m: f"{m['lost']} / {m['duplicates']}"),
        ("GMAC spent", lambda m: _fmt(m["macs"], ".1f", 1e-9)),
        ("MMAC per edit", lambda m: _fmt(m["macs_per_edit"], ".0f", 1e-6)),
        ("answers hit / miss / rebuild",
         lambda m: " / ".join(str(v) for v in m["answers_by_cache"].values())),
        ("durable KB per doc", lambda m: _fmt(m["state_bytes_per_doc"]["durable"], ".1f",
                                              1e-3)),
        ("hot KB per doc", lambda m: _fmt(m["state_bytes_per_doc"]["hot"], ".0f", 1e-3)),
        ("changelog bytes per edit", lambda m: _fmt(m["changelog_bytes_per_edit"], ".0f")),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(m) for m in modes.values()))
    ratios = result["comparison"]
    for name, key in (("edits/s, incremental / this", "edits_per_s_incremental_over_peer"),
                      ("p99 latency, this / incremental", "latency_p99_peer_over_incremental"),
                      ("MACs, this / incremental", "macs_peer_over_incremental")):
        if ratios:
            table.add_row(name, *(_fmt(ratios[m][key], ".1f") + "x" if m in ratios else ""
                                  for m in modes))
    for pair, agreement in result["labels"].items():
        table.add_row(f"labels equal, {pair.replace('_', ' ')}",
                      *(f"{agreement['labels_equal']} / {agreement['revisions']}" if i == 0
                        else "" for i in range(len(modes))))
    return table


@click.command("pipeline")
@click.option("--stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream (.jsonl or .jsonl.gz)")
@click.option("--modes", "--mode", "modes", default=",".join(MODES), show_default=True,
              help="comma-separated: incremental, chunk, dense (the worker's classifier), "
                   "text (no model); each runs on a fresh broker and worker")
@click.option("--docs", type=int, default=None, help="only the first N documents")
@click.option("--limit", type=int, default=None, help="only the first N events")
@click.option("--partitions", type=int, default=4, show_default=True)
@click.option("--timeout", type=float, default=3600.0, show_default=True,
              help="seconds to wait for a mode's answers after its stream is sent")
@click.option("--model", default=None,
              help="model bundle name or directory [default: INCSTREAM_MODEL, else "
                   "polarity-minilm-vq64-stable]; none = text only (the same as --modes text)")
@click.option("--engine-mode", type=click.Choice(["exact", "fast"]), default=None,
              help="the incremental worker's engine mode [default: the worker's]")
@click.option("--session-cache-bytes", type=int, default=None,
              help="the workers' hot cache budget [default: the worker's]")
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="events per second (0 = the whole stream at once, as a backlog)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write the result JSON here (failed runs too)")
def pipeline_bench_command(stream: Path, modes: str, docs: int | None, limit: int | None,
                           partitions: int, timeout: float, model: str | None,
                           engine_mode: str | None, session_cache_bytes: int | None,
                           rate: float, json_out: Path | None) -> None:
    """Edits/s, latency, MACs and state of one worker per mode (incremental, chunk-cache peer,
    full dense re-run) answering the same replayed stream through the embedded broker; exits 1
    if any mode lost a revision (dead-lettered or not answered in time)."""
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if model is not None and model.strip().lower() == "none":
        chosen = [TEXT_ONLY]
    for mode in chosen:
        worker_args(mode)  # a typo fails now, not after the first mode's run
    console = Console(stderr=True)
    result = run_modes(stream, chosen, docs, limit, partitions, timeout, model=model,
                       engine_mode=engine_mode, session_cache_bytes=session_cache_bytes,
                       rate=rate, progress=lambda mode: console.rule(f"mode {mode}"))
    console.print(render_table(result))
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    click.echo(text)
    if not result["complete"]:
        for mode, figures in result["modes"].items():
            if not figures["run"]["complete"]:
                click.echo(f"mode {mode}:", err=True)
                for line in failure_lines(figures["run"]):
                    click.echo(line, err=True)
        raise SystemExit(1)

"""`incstream bench ...`: benchmark commands. The engine logic lives in engine.benchmarks.bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from incstream.pipeline.settings import DEFAULT_MODEL_NAME


@click.group()
def bench() -> None:
    """Benchmarks (ratios measured side by side in one run)."""


@bench.command("engine")
@click.option("--stream", "stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream, JSONL or gzipped JSONL.")
@click.option("--docs", type=int, default=5, show_default=True,
              help="Replay the first N documents of the stream.")
@click.option("--events", type=int, default=40, show_default=True,
              help="At most N edit events per document, 0 = all (every edit also re-runs the "
                   "dense model on the whole document).")
@click.option("--mode", type=click.Choice(["exact", "fast"]), default="fast",
              show_default=True, help="Engine mode to measure.")
@click.option("--tau", type=float, default=None,
              help="Fast mode: code hysteresis, x the median code gap (default: the bundle's "
              "dial, else the mode's).")
@click.option("--context-tolerance", type=float, default=None,
              help="Fast mode: context drift held without recompute, x the median code gap.")
@click.option("--refresh-edits", type=int, default=None,
              help="Fast mode: rebuild a chunk canonically after N updates (0 = never).")
@click.option("--refresh-displacement", type=int, default=None,
              help="Fast mode: rebuild a chunk when a row's id is this far from canonical.")
@click.option("--refresh-margin", type=float, default=None,
              help="Fast mode: rebuild the drifted chunks when the answer's top two class "
                   "probabilities are closer than this (0 = never).")
@click.option("--matmul",
              type=click.Choice(["float32", "bfloat16", "float16", "int8", "auto"]),
              default=None,
              help="Fast mode: how the linear layers multiply (int8: int8 weights and "
                   "dynamically quantized rows, CPU only; default: the bundle's "
                   "dial, else auto, as a worker resolves it: bfloat16 on a CPU with "
                   "AVX512-BF16/AMX or CUDA, else float32).")
@click.option("--kernel", type=click.Choice(["auto", "fused", "torch"]), default=None,
              help="Fast mode: held attention as the compiled CPU kernel (fused) or in "
                   "PyTorch (default: the bundle's dial, else auto: fused where a C compiler "
                   "builds it).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (1 = the comparison the README reports).")
@click.option("--full-dense-every", type=int, default=1, show_default=True,
              help="Time the full dense re-run every N edits (its MACs are counted always).")
@click.option("--model", "model", default=DEFAULT_MODEL_NAME, show_default=True,
              help="Model bundle: a name under engine/bundles or a directory.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto (CUDA when available).")
@click.option("--chunk-tokens", type=click.IntRange(4, 512), default=256, show_default=True,
              help="Max rows per chunk including [CLS] and [SEP].")
@click.option("--codebooks", default=None,
              help="Bench bare codebooks instead of a model bundle (e.g. calibrated-minilm).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Write the result JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bar or table.")
def engine_cmd(stream: Path, docs: int, events: int, mode: str, tau: float | None,
               context_tolerance: float | None, refresh_edits: int | None,
               refresh_displacement: int | None, refresh_margin: float | None,
               matmul: str | None, kernel: str | None, threads: int, full_dense_every: int,
               model: str,
               device: str, chunk_tokens: int, codebooks: str | None,
               json_out: Path, quiet: bool) -> None:
    """Replay an edit stream through the engine and its peers (chunk cache, full dense
    re-run): MACs, seconds, bytes per token, divergence from a fresh exact build."""
    import torch

    from incstream.engine.benchmarks.bench import render_table, run_bench
    from incstream.engine.incremental.fast_mode import resolve_mode

    torch.set_num_threads(threads)
    # The dial a worker would run (resolve_mode: flags, then the bundle, then the defaults,
    # matmul "auto" included), so that the bench measures what a service runs.
    fast = resolve_mode(None if codebooks else _bundle_engine(model), mode="fast", tau=tau,
                        context_tolerance=context_tolerance, refresh_edits=refresh_edits,
                        refresh_displacement=refresh_displacement,
                        refresh_margin=refresh_margin, matmul=matmul, kernel=kernel)
    result = run_bench(stream, docs=docs, events=events, model_bundle=model, device=device,
                       chunk_tokens=chunk_tokens, codebooks=codebooks, progress=not quiet,
                       mode=mode, fast=fast, full_dense_every=full_dense_every)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        render_table(result)
        click.echo(f"wrote {json_out}")


def _bundle_engine(model: str) -> dict:
    """The engine section of a bundle's manifest: its fast dial is where a bench starts, as a
    worker running that bundle does."""
    from incstream.engine.model.model_bundle import read_manifest

    return read_manifest(model)[1].get("engine", {})


def _setting(value: str) -> float | int | str:
    """A dial value from --grid: 0.5 -> float, 64 -> int, bfloat16 -> str."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


@bench.command("engine-batch")
@click.option("--stream", "stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream, JSONL or gzipped JSONL.")
@click.option("--batch", "batches", default="1,4,16", show_default=True,
              help="Batch sizes (documents per batched step), comma-separated.")
@click.option("--rounds", type=int, default=60, show_default=True,
              help="Edits replayed per document.")
@click.option("--matmul", type=click.Choice(["float32", "bfloat16", "float16", "int8", "auto"]),
              default=None,
              help="Fast mode: how the linear layers multiply (int8: int8 weights and "
                   "dynamically quantized rows, CPU only; default: the bundle's "
                   "dial, else auto, as a worker resolves it: bfloat16 on a CPU with "
                   "AVX512-BF16/AMX or CUDA, else float32).")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto (CUDA when available).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Write the result JSON here.")
@click.option("--quiet", is_flag=True, help="No progress bar or table.")
def engine_batch_cmd(stream: Path, batches: str, rounds: int, matmul: str | None, threads: int,
                     device: str, json_out: Path, quiet: bool) -> None:
    """Fast-mode edits of several documents, one at a time vs batched (one matmul per layer
    for all their changed rows), side by side: seconds per edit and agreement."""
    import torch

    from incstream.engine.benchmarks.batching import render_batch_table, run_batch_bench
    from incstream.engine.incremental.fast_mode import resolve_mode

    torch.set_num_threads(threads)
    sizes = tuple(int(b) for b in batches.split(",") if b.strip())
    fast = resolve_mode(_bundle_engine(DEFAULT_MODEL_NAME), mode="fast", matmul=matmul)
    result = run_batch_bench(stream, sizes, rounds, fast=fast,
                             device=device, progress=not quiet)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        render_batch_table(result)
        click.echo(f"wrote {json_out}")


@bench.command("engine-length")
@click.option("--lengths", default="2000,50000", show_default=True,
              help="Comma-separated document lengths in tokens.")
@click.option("--device", default="auto", show_default=True)
@click.option("--chunk-tokens", type=click.IntRange(4, 512), default=256, show_default=True)
@click.option("--modes", default="exact,fast", show_default=True,
              help="Comma-separated engine modes.")
@click.option("--edits", type=int, default=20, show_default=True,
              help="Typed words per document (medians over them).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True)
def engine_length_cmd(lengths: str, device: str, chunk_tokens: int, modes: str, edits: int,
                      threads: int, json_out: Path) -> None:
    """The same edits on a short and a long document: the incremental cost does not grow."""
    import torch

    from incstream.engine.benchmarks.bench import edit_cost_vs_length

    torch.set_num_threads(threads)
    result = edit_cost_vs_length(tuple(int(x) for x in lengths.split(",")),
                                 chunk_tokens=chunk_tokens, device=device,
                                 modes=tuple(modes.split(",")), edits=edits)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        click.echo(f"{row['mode']:>5} {row['tokens']:>7} tokens {row['chunks']:>4} chunks: "
                   f"incremental {row['incremental_macs']['median'] / 1e6:.1f} MMAC, "
                   f"{row['incremental_seconds']['median'] * 1e3:.1f} ms (median of "
                   f"{row['edits']}); dense {row['dense_original_macs'] / 1e9:.1f} GMAC")
    for mode, ratio in result["seconds_ratio_longest_vs_shortest"].items():
        click.echo(f"{mode}: per-edit seconds, longest / shortest document = {ratio:.2f}")


@bench.command("dial")
@click.option("--stream", "stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream, JSONL or gzipped JSONL.")
@click.option("--docs", type=int, default=1, show_default=True)
@click.option("--events", type=int, default=0, show_default=True,
              help="At most N edit events per document, 0 = all.")
@click.option("--grid", default="tau=0.25,context_tolerance=0.1;tau=0.5,context_tolerance=0.2;"
              "tau=1.0,context_tolerance=0.5;tau=2.0,context_tolerance=0.5;"
              "tau=1.0,context_tolerance=0.5,refresh_edits=8,refresh_displacement=2;"
              "tau=1.0,context_tolerance=0.5,refresh_edits=0,refresh_displacement=0",
              show_default=True,
              help="Fast-mode settings to try, ';' between configurations.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--model", "model", default=DEFAULT_MODEL_NAME, show_default=True,
              help="Model bundle name or directory.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True)
def dial_cmd(stream: Path, docs: int, events: int, grid: str, threads: int, model: str,
             json_out: Path) -> None:
    """The fast mode's dial: compute against divergence across settings (one replay each,
    peers measured in every replay)."""
    import torch

    from incstream.engine.benchmarks.bench import run_bench
    from incstream.engine.incremental.fast_mode import resolve_mode

    torch.set_num_threads(threads)
    bundle_engine = _bundle_engine(model)
    rows = []
    for spec in filter(None, (part.strip() for part in grid.split(";"))):
        settings = {k.strip(): _setting(v.strip())
                    for k, v in (item.split("=") for item in spec.split(","))}
        config = resolve_mode(bundle_engine, mode="fast", **settings)
        result = run_bench(stream, docs=docs, events=events, model_bundle=model, mode="fast",
                           fast=config, progress=False, full_dense_every=0)
        peers, div = result["peers"], result["divergence"]
        row = {"config": config.as_dict(),
               "chunk_cache_macs_ratio": peers["chunk_cache"]["macs_ratio"],
               "chunk_cache_time_ratio": peers["chunk_cache"]["time_ratio"],
               "chunk_cache_bf16_time_ratio": peers["chunk_cache_bf16"]["time_ratio"],
               "chunk_cache_onednn_time_ratio": peers["chunk_cache_onednn"]["time_ratio"],
               "full_dense_macs_ratio": peers["full_dense"]["macs_ratio"],
               "in_chunk_macs_ratio": result["macs_ratio_touched_chunks_vs_dense_vq"],
               "engine_macs_mean": result["engine"]["macs"]["mean"],
               "chunk_cache_macs_mean": peers["chunk_cache"]["macs"]["mean"],
               "label_agreement": div["label_agreement"],
               "max_prob_diff": div["max_prob_diff"], "reference_step": div["reference_step"],
               "refreshes": result["chunk_refreshes"],
               "refreshes_near_tie": result["chunk_refreshes_near_tie"],
               "events": result["events"]}
        rows.append(row)
        click.echo(f"{spec:70s} MACs vs chunk cache {row['chunk_cache_macs_ratio']['median']:5.1f}"
                   f" (mean {row['chunk_cache_macs_mean'] / row['engine_macs_mean']:4.1f}), "
                   f"time {row['chunk_cache_time_ratio']['median']:4.2f}, vs full dense "
                   f"{row['full_dense_macs_ratio']['median']:5.0f}; labels "
                   f"{row['label_agreement']:.3f}, |dp| median "
                   f"{row['max_prob_diff']['median']:.3f} p90 {row['max_prob_diff']['p90']:.3f}")
    out = {"stream": str(stream), "model": model, "docs": docs, "events_cap_per_doc": events,
           "device": "cpu", "torch_threads": threads, "rows": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(out, indent=2) + "\n")
    click.echo(f"wrote {json_out}")

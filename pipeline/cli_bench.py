"""`incstream bench ...`: benchmark commands. The engine logic lives in engine.bench."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def bench() -> None:
    """Benchmarks (ratios measured side by side in one run)."""


@bench.command("engine")
@click.option("--stream", "stream", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="doc-edit/v1 stream, JSONL or gzipped JSONL.")
@click.option("--docs", type=int, default=5, show_default=True,
              help="Replay the first N documents of the stream.")
@click.option("--events", type=int, default=40, show_default=True,
              help="At most N edit events per document (keeps a CPU run to a few minutes: "
                   "every edit also re-runs the dense model on the whole document).")
@click.option("--model", "model", default="polarity-minilm-vq64", show_default=True,
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
def engine_cmd(stream: Path, docs: int, events: int, model: str, device: str,
               chunk_tokens: int, codebooks: str | None,
               json_out: Path, quiet: bool) -> None:
    """Replay an edit stream: incremental VQ inference vs dense re-runs (MACs, seconds,
    exactness, tokenization)."""
    from engine.bench import render_table, run_bench

    result = run_bench(stream, docs=docs, events=events, model_bundle=model, device=device,
                       chunk_tokens=chunk_tokens, codebooks=codebooks, progress=not quiet)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        render_table(result)
        click.echo(f"wrote {json_out}")


@bench.command("engine-length")
@click.option("--lengths", default="2000,50000", show_default=True,
              help="Comma-separated document lengths in tokens.")
@click.option("--device", default="auto", show_default=True)
@click.option("--chunk-tokens", type=click.IntRange(4, 512), default=256, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True)
def engine_length_cmd(lengths: str, device: str, chunk_tokens: int, json_out: Path) -> None:
    """The same edit on a short and a long document: the incremental cost does not grow."""
    from engine.bench import edit_cost_vs_length

    result = edit_cost_vs_length(tuple(int(x) for x in lengths.split(",")),
                                 chunk_tokens=chunk_tokens, device=device)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        click.echo(f"{row['tokens']:>7} tokens {row['chunks']:>4} chunks: incremental "
                   f"{row['incremental_macs'] / 1e6:.1f} MMAC, dense "
                   f"{row['dense_original_macs'] / 1e9:.1f} GMAC, ratio {row['macs_ratio']:.0f}")

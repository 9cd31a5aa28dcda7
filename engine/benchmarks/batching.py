"""`incstream bench engine-batch`: edits of B documents updated one at a time vs in one batched
step (engine.incremental.session.apply_ops_batched), side by side in one run.

Two copies of each document's session replay the same edits in rounds (one edit of each of
the B documents per round); per round, the one-at-a-time copies and the batched copies are
timed back to back, alternating which goes first, so machine noise hits both. Reported per
batch size: seconds per edit (median, p10, p90 over rounds), the speed-up, and that both
copies still agree (codes, labels, max |prob diff|).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from incstream.engine.benchmarks.bench import _quantiles, load_bench_model, read_stream
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession, apply_ops_batched
from incstream.engine.model.base_model import load_tokenizer


def run_batch_bench(stream: Path, batch_sizes: tuple[int, ...], rounds: int,
                    fast: FastModeConfig | None = None, chunk_tokens: int = 256,
                    device: str | None = None, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    model, model_label = load_bench_model(device=device)
    tokenizer = load_tokenizer(model.name)
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    config = fast or FastModeConfig()
    documents = list(read_stream(Path(stream), max(batch_sizes)))
    rows = []
    for size in batch_sizes:
        docs = documents[:size]
        edits = [[e["ops"] for e in events if "ops" in e] for _, _, events in docs]
        alone, together = ([DocumentSession(model, tokenizer, text, policy, mode=config)
                            for _, text, _ in docs] for _ in range(2))
        one_s, batch_s = [], []
        for r in tqdm(range(rounds), disable=not progress, desc=f"batch of {len(docs)}"):
            step = [(i, ops[r]) for i, ops in enumerate(edits) if r < len(ops)]
            if not step:
                break
            if r % 2:
                b = _time_batched(together, step)
                a = _time_one_at_a_time(alone, step)
            else:
                a = _time_one_at_a_time(alone, step)
                b = _time_batched(together, step)
            one_s.append(a / len(step))
            batch_s.append(b / len(step))
        diffs, codes_apart = [], 0
        for a, b in zip(alone, together, strict=True):
            pa, pb = torch.softmax(a.logits(), -1), torch.softmax(b.logits(), -1)
            diffs.append(float((pa - pb).abs().max()))
            codes_apart += sum(int((la.codes != lb.codes).sum())
                               for ca, cb in zip(a.chunks, b.chunks, strict=True)
                               for la, lb in zip(ca.layers, cb.layers, strict=True))
        rows.append({"batch": len(docs), "rounds": len(one_s),
                     "one_at_a_time_seconds_per_edit": _quantiles(one_s),
                     "batched_seconds_per_edit": _quantiles(batch_s),
                     "speedup": _quantiles([a / b for a, b in zip(one_s, batch_s, strict=True)]),
                     "speedup_of_totals": sum(one_s) / sum(batch_s),
                     "codes_apart": codes_apart, "max_prob_diff": max(diffs)})
    return {"stream": str(stream), "model": model_label, "fast_config": config.as_dict(),
            "device": str(model.device), "torch_threads": torch.get_num_threads(),
            "chunk_tokens": chunk_tokens, "rows": rows,
            "what": "per round, B documents' next edits: one at a time vs one batched step; "
                    "seconds per edit"}


def _time_one_at_a_time(sessions: list[DocumentSession], step: list[tuple[int, list]]) -> float:
    started = time.perf_counter()
    for i, ops in step:
        sessions[i].apply_ops(ops)
    return time.perf_counter() - started


def _time_batched(sessions: list[DocumentSession], step: list[tuple[int, list]]) -> float:
    started = time.perf_counter()
    apply_ops_batched([(sessions[i], ops) for i, ops in step])
    return time.perf_counter() - started


def render_batch_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"incstream bench engine-batch — {Path(result['stream']).name} "
                        f"({result['device']}, {result['torch_threads']} thread(s))")
    for col in ("batch", "one at a time ms/edit", "batched ms/edit", "speed-up median (p10-p90)",
                "codes apart", "max |prob diff|"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        one, bat, up = (row["one_at_a_time_seconds_per_edit"], row["batched_seconds_per_edit"],
                        row["speedup"])
        table.add_row(str(row["batch"]), f"{1e3 * one['median']:.2f}",
                      f"{1e3 * bat['median']:.2f}",
                      f"{up['median']:.2f} ({up['p10']:.2f}-{up['p90']:.2f})",
                      str(row["codes_apart"]), f"{row['max_prob_diff']:.1e}")
    Console().print(table)



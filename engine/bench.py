"""`incstream bench engine`: replay a doc-edit/v1 stream, compare incremental vs dense.

For every edit, measured side by side in one run (interleaved, so machine noise hits both):
- MACs of re-running the dense ORIGINAL model on the whole document (chunked the same way a
  user would, into <=512-token windows: here the session's own chunks, with canonical
  positions) / MACs of the incremental update; and the same against the dense VQ model;
- wall-clock of that dense original run (whole-text tokenization + chunked forward) / the
  incremental update (window re-tokenization + chunk updates);
- exactness: the touched chunks against a dense VQ forward on the same ids, and at the end of
  each document the whole session against a FRESH session built on the final text (same chunk
  layout, same codes, same label, logits within 1e-9): the answer does not depend on history;
- tokenization: the incrementally maintained tokens vs tokenizing the whole new text;
- within the touched chunks only: dense VQ MACs of those chunks / incremental MACs (what the
  incremental attention itself saves, separate from what chunking saves).
Edits that change no token (e.g. whitespace-only) cost 0 MACs incrementally; they are counted
as `noop_edits` and left out of the ratio distributions (an infinite ratio says nothing).
"""

from __future__ import annotations

import gzip
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.base_model import DEFAULT_BASE_MODEL, load_tokenizer
from engine.chunks import ChunkPolicy
from engine.edit_tokenizer import tokenize
from engine.macs import MacCounter, dense_chunk_macs
from engine.minilm import forward_dense
from engine.model_bundle import DEFAULT_MODEL, load_model_bundle
from engine.session import DocumentSession
from engine.text_ops import sha1_hex
from engine.vq_model import VQModel


def read_stream(path: Path, docs: int) -> Iterator[tuple[str, str, list[dict]]]:
    """(doc_id, snapshot, edit events) for the first `docs` documents of a stream."""
    opener = gzip.open if str(path).endswith(".gz") else open
    current: tuple[str, str, list[dict]] | None = None
    emitted = 0
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            event = json.loads(line)
            if "snapshot" in event:
                if current is not None:
                    yield current
                    emitted += 1
                if emitted >= docs:
                    return
                current = (event["doc_id"], event["snapshot"], [])
            elif current is not None and event["doc_id"] == current[0]:
                current[2].append(event)
    if current is not None and emitted < docs:
        yield current


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p10": float("nan"), "p90": float("nan"),
                "mean": float("nan"), "n": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"median": statistics.median(ordered), "p10": q(0.1), "p90": q(0.9),
            "mean": statistics.fmean(ordered), "n": len(ordered)}


def _dense_original(model: VQModel, tokenizer, session: DocumentSession,
                    macs: MacCounter) -> tuple[float, list[torch.Tensor]]:
    """What a user would run instead: tokenize the whole text, forward every chunk. Timed."""
    started = time.perf_counter()
    ids = tokenizer(session.text, add_special_tokens=False, verbose=False)["input_ids"]
    pooled, pos = [], 0
    with torch.inference_mode():
        for n in session.chunk_lengths:
            chunk = torch.tensor([session.cls_id, *ids[pos : pos + n], session.sep_id],
                                 device=model.device)
            out = forward_dense(model.original, chunk,
                                torch.arange(len(chunk), device=model.device), macs)
            pooled.append(out.mean(0))
            pos += n
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, pooled


def load_bench_model(model_bundle: str = DEFAULT_MODEL, codebooks: str | None = None,
                     device: str | None = None) -> tuple[VQModel, str]:
    """The trained model bundle (default), or bare calibrated codebooks when `codebooks` is
    given (then the head is the identity and only MACs/exactness mean anything)."""
    if codebooks:
        return VQModel.load(DEFAULT_BASE_MODEL, bundle=codebooks, device=device), codebooks
    model, manifest = load_model_bundle(model_bundle, device=device)
    return model, manifest["name"]


def run_bench(stream: Path, docs: int = 5, events: int = 40, model_bundle: str = DEFAULT_MODEL,
              device: str | None = None, chunk_tokens: int = 256, codebooks: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Replay the first `docs` documents (at most `events` edits each); return the result."""
    from tqdm import tqdm

    model, model_label = load_bench_model(model_bundle, codebooks, device)
    tokenizer = load_tokenizer(model.name)
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    layer_fracs: list[list[float]] = [[] for _ in range(model.cfg.layers)]
    macs_ratio, macs_ratio_vq, time_ratio, macs_ratio_chunk = [], [], [], []
    inc_macs, dense_macs_list, inc_secs, dense_secs = [], [], [], []
    fresh_diffs: list[float] = []
    fresh_label_mismatch = fresh_layout_mismatch = fresh_code_mismatch = 0
    checked = mismatches = codes_checked = tok_mismatch = noop = sha_mismatch = 0
    rebuilt = n_events = 0
    max_diff = 0.0
    min_skip_slack = float("inf")
    searched = 0
    per_doc = []
    documents = list(read_stream(Path(stream), docs))
    total = sum(min(len(evs), events) for _, _, evs in documents)
    bar = tqdm(total=total, disable=not progress, desc="edits", unit="edit")
    for doc_id, snapshot, evs in documents:
        session = DocumentSession(model, tokenizer, snapshot, policy)
        doc_events = 0
        for event in evs[:events]:
            if "snapshot" in event:
                session = DocumentSession(model, tokenizer, event["snapshot"], policy)
                bar.update(1)
                continue
            report = session.apply_ops(event["ops"])
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            n_events += 1
            doc_events += 1
            if "sha1_after" in event and sha1_hex(session.text) != event["sha1_after"]:
                sha_mismatch += 1
            dense_counter = MacCounter()
            dense_sec, canon_pooled = _dense_original(model, tokenizer, session, dense_counter)
            if tokenize(tokenizer, session.text).ids != session.tokens.ids:
                tok_mismatch += 1
            rebuilt += sum(u.rebuilt for u in report.chunk_updates)
            for i, u in zip(report.touched, report.chunk_updates, strict=True):
                min_skip_slack = min(min_skip_slack, u.min_skip_slack)
                searched += u.searched
                if not u.rebuilt:
                    rows = len(session.chunks[i].token_ids)
                    for layer, n in enumerate(u.rows_changed):
                        layer_fracs[layer].append(n / rows)
            if report.macs["total"] == 0:
                noop += 1
            else:
                dense_vq = sum(dense_chunk_macs(n + 2, codes=model.k)
                               for n in session.chunk_lengths)
                macs_ratio.append(dense_counter.total / report.macs["total"])
                macs_ratio_vq.append(dense_vq / report.macs["total"])
                touched_vq = sum(dense_chunk_macs(len(session.chunks[i].token_ids), codes=model.k)
                                 for i in report.touched)
                macs_ratio_chunk.append(touched_vq / report.macs["total"])
                time_ratio.append(dense_sec / report.seconds)
                inc_macs.append(report.macs["total"])
                dense_macs_list.append(dense_counter.total)
                inc_secs.append(report.seconds)
                dense_secs.append(dense_sec)
            if report.touched:
                check = session.reference_check(report.touched)
                checked += 1
                max_diff = max(max_diff, check["max_abs_logit_diff"])
                mismatches += check["code_mismatches"]
                codes_checked += check["codes_checked"]
            bar.update(1)
        bar.update(min(len(evs), events) - doc_events)
        final = session.reference_check()
        checked += 1
        max_diff = max(max_diff, final["max_abs_logit_diff"])
        mismatches += final["code_mismatches"]
        codes_checked += final["codes_checked"]
        fresh = DocumentSession(model, tokenizer, session.text, policy, MacCounter())
        fresh_check = compare_sessions(session, fresh)
        fresh_diffs.append(fresh_check["max_abs_logit_diff"])
        fresh_layout_mismatch += fresh_check["layout_mismatch"]
        fresh_code_mismatch += fresh_check["code_mismatches"]
        fresh_label_mismatch += fresh_check["label_mismatch"]
        per_doc.append({"doc_id": doc_id, "events": doc_events, "tokens": len(session.tokens.ids),
                        "chunks": len(session.chunks), "final_check": final,
                        "vs_fresh_session": fresh_check})
    bar.close()
    q = _quantiles
    return {
        "device": str(model.device) + (f" ({torch.cuda.get_device_name()})"
                                       if model.device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "model": model_label,
        "base_model": model.name,
        "k": model.k,
        "chunk_tokens": chunk_tokens,
        "chunk_policy": {"max_tokens": policy.max_tokens, "min_content": policy.min_content,
                         "cut_every": policy.cut_spacing},
        "vq_dtype": str(model.w.dtype), "original_dtype": str(model.original.dtype),
        "stream": str(stream),
        "docs": len(documents),
        "events": n_events,
        "events_cap_per_doc": events,
        "noop_edits": noop,
        "chunk_rebuilds": rebuilt,
        "macs_ratio": q(macs_ratio),
        "macs_ratio_vs_dense_vq": q(macs_ratio_vq),
        "macs_ratio_touched_chunks_vs_dense_vq": q(macs_ratio_chunk),
        "time_ratio": q(time_ratio),
        "incremental_macs": q([float(x) for x in inc_macs]),
        "dense_original_macs": q([float(x) for x in dense_macs_list]),
        "incremental_seconds": q(inc_secs),
        "dense_original_seconds": q(dense_secs),
        "rows_changed_fraction_by_layer": {
            "what": "mean fraction of a touched chunk's rows whose layer input changed "
                    "(incrementally updated chunks only; layer 0 = inserted/replaced tokens)",
            "mean": [statistics.fmean(f) if f else None for f in layer_fracs],
            "median": [statistics.median(f) if f else None for f in layer_fracs],
        },
        "exact": {"checked": checked, "max_abs_logit_diff": max_diff,
                  "code_mismatches": mismatches, "codes_checked": codes_checked,
                  "code_mismatch_rate": mismatches / max(codes_checked, 1),
                  "codebook_searches": searched,
                  "min_skipped_search_slack": min_skip_slack,
                  "what_slack_means": "smallest margin/2 - drift of any (row, head) whose "
                                      "search was skipped; skipping is exact while > 1e-6"},
        "tokenization_mismatches": tok_mismatch,
        "sha1_mismatches": sha_mismatch,
        "vs_fresh_session": {
            "what": "at the end of each document, the incrementally maintained session vs a "
                    "fresh session built on the final text",
            "docs": len(fresh_diffs), "max_abs_logit_diff": max(fresh_diffs, default=0.0),
            "layout_mismatches": fresh_layout_mismatch,
            "code_mismatches": fresh_code_mismatch,
            "label_mismatches": fresh_label_mismatch,
        },
        "per_doc": per_doc,
    }


def render_table(result: dict[str, Any]) -> None:
    """A human-readable summary on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"incstream bench engine — {Path(result['stream']).name} "
                        f"({result['docs']} docs, {result['events']} edits, {result['device']})")
    table.add_column("metric")
    for col in ("median", "p10", "p90"):
        table.add_column(col, justify="right")
    for key, label in (("macs_ratio", "MACs dense original / incremental"),
                       ("macs_ratio_vs_dense_vq", "MACs dense VQ / incremental"),
                       ("macs_ratio_touched_chunks_vs_dense_vq",
                        "MACs dense VQ on touched chunks / incremental"),
                       ("time_ratio", "time dense original / incremental"),
                       ("incremental_seconds", "incremental seconds per edit"),
                       ("dense_original_seconds", "dense original seconds per edit")):
        row = result[key]
        table.add_row(label, *(f"{row[c]:.3g}" for c in ("median", "p10", "p90")))
    console = Console()
    console.print(table)
    fracs = result["rows_changed_fraction_by_layer"]["mean"]
    console.print("rows changed per layer (mean fraction of a touched chunk): "
                  + " ".join(f"{f:.2f}" if f is not None else "-" for f in fracs))
    ex = result["exact"]
    console.print(f"exact: {ex['checked']} checks, max |logit diff| {ex['max_abs_logit_diff']:.2e},"
                  f" code mismatches {ex['code_mismatches']}/{ex['codes_checked']}; "
                  f"tokenization mismatches {result['tokenization_mismatches']}; "
                  f"no-op edits {result['noop_edits']}; chunk rebuilds {result['chunk_rebuilds']}")
    fr = result["vs_fresh_session"]
    console.print(f"vs a fresh build of each final text ({fr['docs']} docs): max |logit diff| "
                  f"{fr['max_abs_logit_diff']:.2e}, layout mismatches {fr['layout_mismatches']}, "
                  f"code mismatches {fr['code_mismatches']}, label mismatches "
                  f"{fr['label_mismatches']}")


def compare_sessions(a: DocumentSession, b: DocumentSession) -> dict[str, Any]:
    """Two sessions on the same text: chunk layout, codes, logits and label agreement."""
    layout = a.chunk_lengths != b.chunk_lengths
    codes = 0
    if not layout:
        for ca, cb in zip(a.chunks, b.chunks, strict=True):
            for la, lb in zip(ca.layers, cb.layers, strict=True):
                codes += int((la.codes != lb.codes).sum())
    la, lb = a.logits(), b.logits()
    diff = float((la - lb).abs().max()) if la.shape == lb.shape else float("inf")
    return {"layout_mismatch": int(layout), "code_mismatches": codes,
            "max_abs_logit_diff": diff,
            "label_mismatch": int(int(la.argmax()) != int(lb.argmax()))}


def edit_cost_vs_length(lengths: tuple[int, ...] = (2_000, 50_000), chunk_tokens: int = 256,
                        model_name: str = DEFAULT_BASE_MODEL, device: str | None = None,
                        text: str | None = None) -> dict[str, Any]:
    """The same edit on documents of different lengths: incremental vs dense MACs.

    Documents are made by repeating a PEP-like paragraph up to each token count; the edit
    inserts a few words near the start (same chunk content in every document).
    """
    model = VQModel.load(model_name, device=device)
    tokenizer = load_tokenizer(model_name)
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    paragraph = text or (
        "This PEP proposes a backwards compatible mechanism that allows methods to skip the "
        "body of the associated statement. The lack of this ability currently means the "
        "decorator is unable to fulfil its specification.\n\n")
    rows = []
    for target in lengths:
        body = paragraph
        while len(tokenizer(body, add_special_tokens=False, verbose=False)["input_ids"]) < target:
            body += paragraph
        session = DocumentSession(model, tokenizer, body, policy)
        report = session.apply_ops([{"retain": 60}, {"insert": " quite simply"}])
        check = session.reference_check(report.touched)
        dense = sum(dense_chunk_macs(n + 2) for n in session.chunk_lengths)
        rows.append({"tokens": len(session.tokens.ids), "chunks": len(session.chunks),
                     "incremental_macs": report.macs["total"], "dense_original_macs": dense,
                     "macs_ratio": dense / report.macs["total"],
                     "incremental_seconds": report.seconds, "exact": check})
        del session
    return {"device": str(model.device), "chunk_tokens": chunk_tokens, "rows": rows}

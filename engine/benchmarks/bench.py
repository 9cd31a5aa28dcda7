"""`incstream bench engine`: replay a doc-edit/v1 stream through the engine and its peers.

For every edit, measured side by side in one run (interleaved, so machine noise hits all; the
seconds also once more with the engine and the chunk cache each alone, as a service runs them:
engine.benchmarks.alone_timing):
- the engine (exact or fast mode): MACs and seconds of the update (window re-tokenization,
  chunk layout, chunk updates), bytes held per token;
- the peers a user would pick instead (engine.benchmarks.peers), on the same tokens and chunks:
  the chunk cache (dense float32 re-run of the chunks whose ids changed, one pooled vector per
  chunk; also with bfloat16 matmuls and with oneDNN-packed float32 matrices) and the full
  dense re-run of the document; the engine's ratios against each;
- divergence: the engine's class probabilities vs a fresh exact build of the same text, after
  every edit (label agreement, max |prob diff|);
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from incstream.engine.benchmarks.alone_timing import time_alone
from incstream.engine.benchmarks.peers import FreshReference, chunk_cache_variants, full_dense
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.edit_tokenizer import tokenize
from incstream.engine.incremental.fast_chunk import use_fused_kernel
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.incremental.text_ops import sha1_hex
from incstream.engine.model.base_model import DEFAULT_BASE_MODEL, load_tokenizer
from incstream.engine.model.device import device_name
from incstream.engine.model.macs import MacCounter, dense_chunk_macs
from incstream.engine.model.model_bundle import DEFAULT_MODEL, load_model_bundle
from incstream.engine.model.vq_model import VQModel

CONFIDENT_MARGIN = 0.2  # top-two probability gap of a "confident" reference label


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


def load_bench_model(model_bundle: str = DEFAULT_MODEL, codebooks: str | None = None,
                     device: str | None = None) -> tuple[VQModel, str]:
    """The trained model bundle (default), or bare calibrated codebooks when `codebooks` is
    given (then the head is the identity and only MACs/exactness mean anything)."""
    if codebooks:
        return VQModel.load(DEFAULT_BASE_MODEL, bundle=codebooks, device=device), codebooks
    model, manifest = load_model_bundle(model_bundle, device=device)
    return model, manifest["name"]


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.to(torch.float64), -1)


def run_bench(stream: Path, docs: int = 5, events: int = 40, model_bundle: str = DEFAULT_MODEL,
              device: str | None = None, chunk_tokens: int = 256, codebooks: str | None = None,
              progress: bool = True, mode: str = "exact",
              fast: FastModeConfig | None = None, full_dense_every: int = 1) -> dict[str, Any]:
    """Replay the first `docs` documents (at most `events` edits each, 0 = all) through the
    engine in `mode`, and after every edit, in the same run on the same tokens and chunks: the
    chunk-cache peer, the full dense re-run (timed every `full_dense_every` edits; its MACs
    every edit), and the divergence from a fresh exact build of the same text."""
    from tqdm import tqdm

    model, model_label = load_bench_model(model_bundle, codebooks, device)
    tokenizer = load_tokenizer(model.name)
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    engine_mode: str | FastModeConfig = "exact" if mode == "exact" else (fast or FastModeConfig())
    reference = FreshReference(model, tokenizer, policy)
    variants = chunk_cache_variants(model.device)
    layer_fracs: list[list[float]] = [[] for _ in range(model.cfg.layers)]
    rec: dict[str, list[float]] = {k: [] for k in (
        "engine_macs", "engine_seconds", "cc_macs", "full_macs", "full_seconds",
        "cc_macs_ratio", "full_macs_ratio", "full_time_ratio", "alone_engine_seconds",
        *(f"{v.key}:{what}" for v in variants
          for what in ("seconds", "time_ratio", "seconds_alone", "time_ratio_alone")),
        "touched_macs_ratio", "prob_diff", "engine_bytes_per_token", "cc_bytes_per_token",
        "reference_step")}
    label_agree = revisions = 0
    confident = confident_agree = reference_flips = 0
    checked = mismatches = codes_checked = tok_mismatch = noop = sha_mismatch = 0
    rebuilt = refreshed = near_ties = n_events = 0
    max_diff = 0.0
    min_skip_slack = float("inf")
    searched = 0
    per_doc = []
    documents = list(read_stream(Path(stream), docs))
    cap = events if events > 0 else None
    total = sum(len(evs[:cap]) for _, _, evs in documents)
    bar = tqdm(total=total, disable=not progress, desc=f"edits ({mode})", unit="edit")
    fresh_diffs: list[float] = []
    fresh_label_mismatch = fresh_layout_mismatch = fresh_code_mismatch = 0
    for doc_id, snapshot, evs in documents:
        # Each alone first (engine.benchmarks.alone_timing), then all interleaved.
        alone, alone_caches = time_alone(model, tokenizer, snapshot, evs[:cap], policy,
                                         engine_mode, variants)
        rec["alone_engine_seconds"] += [sec for sec in alone if sec is not None]
        for variant, seconds in zip(variants, alone_caches, strict=True):
            for e_sec, cc_sec in zip(alone, seconds, strict=True):
                if e_sec is not None:  # (the peers' are None exactly where the engine's are)
                    rec[f"{variant.key}:seconds_alone"].append(cc_sec)
                    rec[f"{variant.key}:time_ratio_alone"].append(cc_sec / e_sec)
        session = DocumentSession(model, tokenizer, snapshot, policy, mode=engine_mode)
        caches = [v.cache(model, session.cls_id, session.sep_id) for v in variants]
        for cache in caches:
            cache.update(session.tokens.ids, session.chunk_lengths, MacCounter())
        doc_events = doc_agree = 0
        doc_diffs: list[float] = []
        prev_ref = _probs(reference.logits(session.text))
        for event in evs[:cap]:
            if "snapshot" in event:
                session = DocumentSession(model, tokenizer, event["snapshot"], policy,
                                          mode=engine_mode)
                bar.update(1)
                continue
            report = session.apply_ops(event["ops"])
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            n_events += 1
            doc_events += 1
            if "sha1_after" in event and sha1_hex(session.text) != event["sha1_after"]:
                sha_mismatch += 1
            cc_counter = MacCounter()
            cache_seconds = [cache.update(session.tokens.ids, session.chunk_lengths,
                                          cc_counter if i == 0 else MacCounter())[0]
                             for i, cache in enumerate(caches)]
            full_counter = MacCounter()
            if full_dense_every and n_events % full_dense_every == 0:
                full_sec, _ = full_dense(model, tokenizer, session.text, policy, full_counter)
            else:
                full_sec = float("nan")
                full_counter.add("linear", sum(dense_chunk_macs(n + 2)
                                               for n in session.chunk_lengths))
            # Divergence from a fresh exact build of the same text, after every edit.
            ref = _probs(reference.logits(session.text))
            rec["reference_step"].append(float((ref - prev_ref).abs().max()))
            reference_flips += int(int(ref.argmax()) != int(prev_ref.argmax()))
            prev_ref = ref
            mine = _probs(session.logits())
            diff = float((mine - ref).abs().max())
            agree = int(int(mine.argmax()) == int(ref.argmax()))
            rec["prob_diff"].append(diff)
            doc_diffs.append(diff)
            label_agree += agree
            doc_agree += agree
            top2 = ref.topk(min(2, len(ref))).values
            if len(top2) == 2 and float(top2[0] - top2[1]) >= CONFIDENT_MARGIN:
                confident += 1
                confident_agree += agree
            revisions += 1
            if tokenize(tokenizer, session.text).ids != list(session.tokens.ids):
                tok_mismatch += 1
            rebuilt += sum(u.rebuilt for u in report.chunk_updates)
            refreshed += sum(getattr(u, "refreshed", False) for u in report.chunk_updates)
            near_ties += sum(getattr(u, "near_tie", False) for u in report.chunk_updates)
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
                e_macs, e_sec = report.macs["total"], report.seconds
                touched = sum(dense_chunk_macs(len(session.chunks[i].token_ids), codes=model.k)
                              for i in report.touched)
                rec["engine_macs"].append(float(e_macs))
                rec["engine_seconds"].append(e_sec)
                rec["cc_macs"].append(float(cc_counter.total))
                rec["full_macs"].append(float(full_counter.total))
                rec["cc_macs_ratio"].append(cc_counter.total / e_macs)
                for variant, cc_sec in zip(variants, cache_seconds, strict=True):
                    rec[f"{variant.key}:seconds"].append(cc_sec)
                    rec[f"{variant.key}:time_ratio"].append(cc_sec / e_sec)
                rec["full_macs_ratio"].append(full_counter.total / e_macs)
                rec["touched_macs_ratio"].append(touched / e_macs)
                if full_sec == full_sec:
                    rec["full_seconds"].append(full_sec)
                    rec["full_time_ratio"].append(full_sec / e_sec)
            if mode == "exact" and report.touched:
                check = session.reference_check(report.touched)
                checked += 1
                max_diff = max(max_diff, check["max_abs_logit_diff"])
                mismatches += check["code_mismatches"]
                codes_checked += check["codes_checked"]
            bar.update(1)
        n_tokens = max(1, len(session.tokens.ids))
        rec["engine_bytes_per_token"].append(session.nbytes() / n_tokens)
        rec["cc_bytes_per_token"].append(caches[0].nbytes() / n_tokens)
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
        per_doc.append({"doc_id": doc_id, "events": doc_events, "tokens": n_tokens,
                        "chunks": len(session.chunks), "final_check": final,
                        "label_agreement": doc_agree / max(1, len(doc_diffs)),
                        "max_prob_diff": _quantiles(doc_diffs), "vs_fresh_session": fresh_check,
                        "engine_bytes_per_token": session.nbytes() / n_tokens})
    bar.close()
    q = _quantiles
    result: dict[str, Any] = {
        "device": device_name(model.device),
        "torch_threads": torch.get_num_threads(),
        "mode": mode,
        "fast_config": engine_mode.as_dict() if mode == "fast" else None,
        "model": model_label,
        "base_model": model.name,
        "k": model.k,
        "chunk_tokens": chunk_tokens,
        "chunk_policy": {"max_tokens": policy.max_tokens, "min_content": policy.min_content,
                         "cut_every": policy.cut_spacing},
        "engine_dtype": ("float64" if mode == "exact" else
                         f"{engine_mode.matmul} matmuls, float32 attention, float16 state"),
        # how the fast mode's held attention ran: the compiled CPU kernel or PyTorch
        "held_attention": (None if mode == "exact" else
                           "fused" if use_fused_kernel(engine_mode, model.device,
                                                       model.w.config.head_dim) else "torch"),
        "original_dtype": str(model.original.dtype),
        "stream": str(stream),
        "docs": len(documents),
        "events": n_events,
        "events_cap_per_doc": events,
        "noop_edits": noop,
        "chunk_rebuilds": rebuilt,
        "chunk_refreshes": refreshed,
        "chunk_refreshes_near_tie": near_ties,  # (of chunk_refreshes) refresh_margin's
        "what_ratios_mean": "per edit, peer / engine (higher = the engine does less); edits "
                            "that change no token are left out (noop_edits)",
        "peers": {
            **{v.key: {"what": v.what,
                       "macs_ratio": q(rec["cc_macs_ratio"]), "macs": q(rec["cc_macs"]),
                       **{what: q(rec[f"{v.key}:{what}"]) for what in (
                           "seconds", "time_ratio", "seconds_alone", "time_ratio_alone")}}
               for v in variants},
            "full_dense": {"macs_ratio": q(rec["full_macs_ratio"]),
                           "time_ratio": q(rec["full_time_ratio"]),
                           "macs": q(rec["full_macs"]), "seconds": q(rec["full_seconds"])},
        },
        "engine": {"macs": q(rec["engine_macs"]), "seconds": q(rec["engine_seconds"]),
                   "seconds_alone": q(rec["alone_engine_seconds"])},
        "what_alone": "time_ratio / seconds: every edit timed interleaved with the other peers "
                      "and the reference (all share the machine's state; the engine's weights "
                      "start cold each edit); *_alone: the engine, then the chunk cache, each "
                      "replaying the document by itself, as a service runs it "
                      "(engine.benchmarks.alone_timing)",
        "bytes_per_token": {"engine": q(rec["engine_bytes_per_token"]),
                            "chunk_cache": q(rec["cc_bytes_per_token"])},
        "divergence": {
            "what": "after every edit: the engine's class probabilities vs a fresh exact build "
                    "of the same text (every event of every replayed document)",
            "revisions": revisions,
            "label_agreement": label_agree / max(1, revisions),
            "label_agreement_confident": {
                "what": f"label agreement on the revisions where the fresh exact build's top "
                        f"two probabilities are at least {CONFIDENT_MARGIN} apart (a label "
                        "the reference itself holds firmly)",
                "revisions": confident,
                "agreement": confident_agree / confident if confident else None},
            "reference_label_flips": {
                "what": "revisions whose fresh exact label differs from the previous "
                        "revision's: how often the reference itself changes its mind",
                "count": reference_flips, "rate": reference_flips / max(1, revisions)},
            "max_prob_diff": q(rec["prob_diff"]) | {"max": max(rec["prob_diff"], default=0.0)},
            "reference_step": q(rec["reference_step"]) | {
                "what": "how far the fresh exact build's own probabilities move from one "
                        "revision to the next (max |prob diff|): the reference's jitter"},
        },
        # Kept from earlier versions of this benchmark (same meaning):
        "macs_ratio": q(rec["full_macs_ratio"]),
        "time_ratio": q(rec["full_time_ratio"]),
        "macs_ratio_touched_chunks_vs_dense_vq": q(rec["touched_macs_ratio"]),
        "incremental_seconds": q(rec["engine_seconds"]),
        "dense_original_seconds": q(rec["full_seconds"]),
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
                  "what": "reference_check (a fresh build of the text) of touched chunks after "
                          "every edit (exact mode) and of every chunk at the end of each "
                          "document; in fast mode these count its divergence in codes"},
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
    return result


def render_table(result: dict[str, Any]) -> None:
    """A human-readable summary on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    def med(row: dict, scale: float = 1.0, fmt: str = ".3g") -> list[str]:
        return [format(row[c] * scale, fmt) for c in ("median", "p10", "p90")]

    console = Console()
    title = (f"incstream bench engine — {Path(result['stream']).name}, {result['mode']} mode "
             f"({result['docs']} docs, {result['events']} edits, {result['device']}, "
             f"{result['torch_threads']} thread(s))")
    table = Table(title=title)
    table.add_column("per edit")
    for col in ("median", "p10", "p90"):
        table.add_column(col, justify="right")
    peers = result["peers"]
    table.add_row("engine MMACs", *med(result["engine"]["macs"], 1e-6))
    table.add_row("chunk cache MMACs", *med(peers["chunk_cache"]["macs"], 1e-6))
    table.add_row("full dense MMACs", *med(peers["full_dense"]["macs"], 1e-6))
    variants = [(key, key.replace("chunk_cache", "chunk cache").replace("_", " "))
                for key in peers if key.startswith("chunk_cache")]
    table.add_row("engine ms", *med(result["engine"]["seconds"], 1e3))
    for key, name in variants:
        table.add_row(f"{name} ms", *med(peers[key]["seconds"], 1e3))
    table.add_row("full dense ms", *med(peers["full_dense"]["seconds"], 1e3))
    table.add_row("MACs chunk cache / engine", *med(peers["chunk_cache"]["macs_ratio"]))
    for key, name in variants:
        table.add_row(f"time {name} / engine", *med(peers[key]["time_ratio"]))
    table.add_row("engine ms, alone", *med(result["engine"]["seconds_alone"], 1e3))
    for key, name in variants:
        table.add_row(f"{name} ms, alone", *med(peers[key]["seconds_alone"], 1e3))
    for key, name in variants:
        table.add_row(f"time {name} / engine, each alone", *med(peers[key]["time_ratio_alone"]))
    table.add_row("MACs full dense / engine", *med(peers["full_dense"]["macs_ratio"]))
    table.add_row("time full dense / engine", *med(peers["full_dense"]["time_ratio"]))
    table.add_row("max |prob diff| vs fresh exact", *med(result["divergence"]["max_prob_diff"]))
    console.print(table)
    bpt = result["bytes_per_token"]
    dv = result["divergence"]
    console.print(f"bytes held per token (median over docs): engine "
                  f"{bpt['engine']['median']:,.0f}, chunk cache {bpt['chunk_cache']['median']:.1f}")
    firm = dv["label_agreement_confident"]
    console.print(f"divergence over {dv['revisions']} revisions: label agreement "
                  f"{dv['label_agreement']:.4f} ({firm['agreement'] or float('nan'):.4f} on the "
                  f"{firm['revisions']} with a confident reference; the reference flips its "
                  f"own label on {dv['reference_label_flips']['rate']:.1%}), max |prob diff| max "
                  f"{dv['max_prob_diff']['max']:.3g}; the reference itself moves by "
                  f"{dv['reference_step']['median']:.3g} (p90 {dv['reference_step']['p90']:.3g})"
                  " per revision"
                  f"; chunk refreshes {result['chunk_refreshes']} (near a tie "
                  f"{result['chunk_refreshes_near_tie']}), rebuilds "
                  f"{result['chunk_rebuilds']}")
    fracs = result["rows_changed_fraction_by_layer"]["mean"]
    console.print("rows changed per layer (mean fraction of a touched chunk): "
                  + " ".join(f"{f:.2f}" if f is not None else "-" for f in fracs))
    ex = result["exact"]
    console.print(f"vs fresh build (reference_check): {ex['checked']} checks, max |logit diff| "
                  f"{ex['max_abs_logit_diff']:.2e}, code mismatches {ex['code_mismatches']}/"
                  f"{ex['codes_checked']}; tokenization mismatches "
                  f"{result['tokenization_mismatches']}; no-op edits {result['noop_edits']}")
    fr = result["vs_fresh_session"]
    console.print(f"final session vs a fresh build ({fr['docs']} docs): max |logit diff| "
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
                        text: str | None = None, modes: tuple[str, ...] = ("exact", "fast"),
                        edits: int = 20) -> dict[str, Any]:
    """The same edits on documents of different lengths, in each mode: MACs and seconds.

    The documents' edits are interleaved (edit i on every document, then edit i+1), so machine
    noise hits every length alike. Documents are made by repeating a PEP-like paragraph up to
    each token count; the edits type a few words into the second paragraph (same chunk content
    in every document), so any difference in cost comes from the document's length alone
    (per-edit Python over the whole document would show here).
    """
    model = VQModel.load(model_name, device=device)
    tokenizer = load_tokenizer(model_name)
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    paragraph = text or (
        "This PEP proposes a backwards compatible mechanism that allows methods to skip the "
        "body of the associated statement. The lack of this ability currently means the "
        "decorator is unable to fulfil its specification.\n\n")
    words = ["quite ", "simply ", "and ", "without ", "any ", "doubt ", "this ", "works "]
    rows = []
    for mode in modes:
        sessions = []
        for target in lengths:
            body = paragraph
            while len(tokenizer(body, add_special_tokens=False,
                                verbose=False)["input_ids"]) < target:
                body += paragraph
            sessions.append(DocumentSession(model, tokenizer, body, policy, mode=mode))
        # Interleaved: edit i on every document before edit i+1, so machine noise hits all.
        at = [len(paragraph) + 60] * len(sessions)
        seconds: list[list[float]] = [[] for _ in sessions]
        macs: list[list[float]] = [[] for _ in sessions]
        touched: list[list[int]] = [[] for _ in sessions]
        for i in range(edits):
            word = words[i % len(words)]
            for j, session in enumerate(sessions):
                report = session.apply_ops([{"retain": at[j]}, {"insert": word}])
                at[j] += len(word)
                seconds[j].append(report.seconds)
                macs[j].append(float(report.macs["total"]))
                touched[j].append(len(report.touched))
        for j, session in enumerate(sessions):
            dense = sum(dense_chunk_macs(n + 2) for n in session.chunk_lengths)
            rows.append({"mode": mode, "tokens": len(session.tokens.ids),
                         "chunks": len(session.chunks), "edits": edits,
                         "incremental_macs": _quantiles(macs[j]),
                         "incremental_seconds": _quantiles(seconds[j]),
                         "chunks_touched_max": max(touched[j]),
                         "dense_original_macs": dense,
                         "macs_ratio": dense / statistics.median(macs[j])})
        del sessions
    ratios = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        ratios[mode] = (mine[-1]["incremental_seconds"]["median"]
                        / mine[0]["incremental_seconds"]["median"])
    return {"device": str(model.device), "torch_threads": torch.get_num_threads(),
            "chunk_tokens": chunk_tokens, "rows": rows,
            "seconds_ratio_longest_vs_shortest": ratios}

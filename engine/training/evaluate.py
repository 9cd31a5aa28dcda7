"""`incstream eval` and `incstream classify`: accuracy of dense vs VQ vs incremental answers.

Per document (chunked as DocumentSession does, see engine.training.train_data):
- dense probe: the ORIGINAL float32 encoder (model.original) + the bundle's dense head (a
  logistic regression on frozen document vectors); keys `acc_dense_probe`, `f1_dense_probe`
  (`acc_dense`, `f1_dense` in JSON written before the fine-tuned baseline: probe_metrics reads
  both);
- dense fine-tuned (when given, engine.model.dense_finetuned): the whole encoder and a head
  fine-tuned for the task (`incstream train-dense`), on the same documents cut at its own
  training chunk size; keys `acc_dense_finetuned`, `f1_dense_finetuned` (None without one);
- vq: VQModel.forward (float64, THE REFERENCE) per chunk + the bundle's VQ head;
- incremental: the document is built up by a replayed edit history in a DocumentSession
  (start from its first piece, then insert the remaining pieces one op at a time at the end,
  then replace one word in the middle); the final session answer is compared with the VQ answer
  on the same text. Stable positions and edit-driven chunk boundaries may differ from a fresh
  build, so logits can differ slightly; `incremental_agreement` is the fraction of documents
  whose label equals the VQ label, and `max_abs_logit_diff_vs_reference` the session's own
  exactness check (engine.incremental.session.DocumentSession.reference_check) at the end;
- vq fast (when a fast-mode dial is given, engine.incremental.fast_mode): the same replayed
  history in a fast-mode session, whose answer depends on the history (stable position ids,
  held codes); keys `acc_vq_fast`, `f1_vq_fast`, `label_agreement_fast_vs_fresh` (the fraction
  of those documents whose fast label equals the fresh one-shot VQ label) and
  `max_abs_prob_diff_fast_vs_fresh` (median, p90, max over the documents).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model.dense_finetuned import DenseFinetuned
from incstream.engine.model.head import ClassificationHead, document_pooled
from incstream.engine.model.minilm import MiniLMWeights, forward_dense
from incstream.engine.model.vq_model import VQModel
from incstream.engine.training.labelled_datasets import LabelledDataset
from incstream.engine.training.train_data import DocChunks, chunk_documents


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_labels: int) -> float:
    """Unweighted mean over classes of F1 (a class with no gold and no predicted docs: skipped)."""
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / max(1, len(gold))


def probe_metrics(row: dict) -> tuple[float, float]:
    """(accuracy, macro-F1) of the dense linear probe from an eval row, new keys or old."""
    if "acc_dense_probe" in row:
        return row["acc_dense_probe"], row["f1_dense_probe"]
    return row["acc_dense"], row["f1_dense"]


def dense_logits(model: VQModel, head: ClassificationHead, doc: DocChunks) -> torch.Tensor:
    """The dense probe: the base encoder (model.original) + the bundle's dense head."""
    return encoder_logits(model.original, head, doc)


def encoder_logits(w: MiniLMWeights, head: ClassificationHead, doc: DocChunks) -> torch.Tensor:
    """forward_dense per chunk, pooled like the engine (document_pooled), then `head`."""
    with torch.no_grad():
        pooled = [forward_dense(w, c.to(w.device), torch.arange(len(c), device=w.device)).mean(0)
                  for c in doc.chunks]
        return head.logits(document_pooled(pooled, doc.counts).to(torch.float64)).cpu()


def vq_logits(model: VQModel, doc: DocChunks) -> torch.Tensor:
    with torch.no_grad():
        pooled = [model.forward(c, torch.arange(len(c))).pooled for c in doc.chunks]
        return model.head.logits(document_pooled(pooled, doc.counts)).cpu()


def edit_history(text: str, pieces: int = 4) -> tuple[str, list[list[dict]]]:
    """A first piece of `text` and doc-edit/v1 op lists that build `text` from it: appends at
    the end, then one word replaced in the middle (and put back, so the final text is `text`)."""
    cuts = sorted({text.rfind(" ", 0, len(text) * i // pieces) + 1 for i in range(1, pieces)})
    cuts = [c for c in cuts if 0 < c < len(text)] + [len(text)]
    history, cur = [], cuts[0]
    for end in cuts[1:]:
        history.append([{"retain": cur}, {"insert": text[cur:end]}])
        cur = end
    mid = text.find(" ", len(text) // 2)
    if mid > 0:
        word_end = text.find(" ", mid + 1)
        word_end = len(text) if word_end < 0 else word_end
        word = text[mid + 1 : word_end]
        history.append([{"retain": mid + 1}, {"delete": len(word)}, {"insert": "edited"}])
        history.append([{"retain": mid + 1}, {"delete": len("edited")}, {"insert": word}])
    return text[: cuts[0]], history


def incremental_logits(model: VQModel, tokenizer, policy: ChunkPolicy, text: str,
                       mode: str | FastModeConfig = "exact") -> tuple[torch.Tensor, float]:
    """Final logits of a session built by edit_history(text), and its reference check (the
    largest logit difference from a fresh exact build: ~0 in exact mode, the divergence in
    fast mode)."""
    first, history = edit_history(text)
    with torch.no_grad():
        session = DocumentSession(model, tokenizer, first, policy, mode=mode)
        for ops in history:
            session.apply_ops(ops)
        if session.text != text:
            raise AssertionError("replayed history did not rebuild the document")
        check = session.reference_check()
        return session.logits().cpu().to(torch.float64), check["max_abs_logit_diff"]


def quantiles(values: Sequence[float]) -> dict[str, float] | None:
    """median, p10, p90 and max of `values` (None when empty)."""
    if not values:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return {"median": float(t.median()), "p10": float(t.quantile(0.1)),
            "p90": float(t.quantile(0.9)), "max": float(t.max())}


def evaluate_dataset(model: VQModel, dense_head: ClassificationHead, tokenizer,
                     dataset: LabelledDataset, *, chunk_tokens: int = 256,
                     max_doc_tokens: int | None = None, keep: str = "head",
                     limit: int | None = None,
                     incremental_docs: int | None = None, progress: bool = False,
                     finetuned: DenseFinetuned | None = None,
                     fast: FastModeConfig | None = None) -> dict:
    """Dense (probe, and fine-tuned when given) / VQ / incremental (exact, and fast when a dial
    is given) metrics of one split."""
    started = time.time()
    policy = ChunkPolicy(max_tokens=chunk_tokens)
    texts, gold = list(dataset.texts), list(dataset.labels)
    if limit is not None:
        texts, gold = texts[:limit], gold[:limit]
    docs = chunk_documents(tokenizer, texts, policy, max_doc_tokens, keep)
    n_labels = len(dataset.label_names)
    n_inc = len(docs) if incremental_docs is None else min(incremental_docs, len(docs))
    # an evenly spaced subset (splits are ordered by class, so a prefix would be one class)
    inc_idx = {round(j * len(docs) / n_inc) for j in range(n_inc)} if n_inc else set()
    pred_dense, pred_vq, pred_inc, pred_fast, prob_diff_fast = [], [], [], [], []
    max_diff = 0.0
    for i, doc in enumerate(tqdm(docs, desc=f"eval {dataset.name}", disable=not progress)):
        pred_dense.append(int(dense_logits(model, dense_head, doc).argmax()))
        fresh = vq_logits(model, doc)
        pred_vq.append(int(fresh.argmax()))
        if i in inc_idx:
            logits, diff = incremental_logits(model, tokenizer, policy, doc.text)
            pred_inc.append(int(logits.argmax()))
            max_diff = max(max_diff, diff, float((logits - fresh).abs().max()))
            if fast is not None:
                fast_logits, _ = incremental_logits(model, tokenizer, policy, doc.text, fast)
                pred_fast.append(int(fast_logits.argmax()))
                prob_diff_fast.append(float((fast_logits.softmax(-1) - fresh.softmax(-1))
                                            .abs().max()))
    inc_sorted = sorted(inc_idx)
    gold_inc = [gold[i] for i in inc_sorted]
    vq_inc = [pred_vq[i] for i in inc_sorted]
    out = {
        "name": dataset.name,
        "n_test": len(docs),
        "acc_dense_probe": accuracy(pred_dense, gold),
        "acc_vq": accuracy(pred_vq, gold),
        "acc_incremental": accuracy(pred_inc, gold_inc) if n_inc else None,
        "f1_dense_probe": macro_f1(pred_dense, gold, n_labels),
        "f1_vq": macro_f1(pred_vq, gold, n_labels),
        "f1_incremental": macro_f1(pred_inc, gold_inc, n_labels) if n_inc else None,
        "n_incremental": n_inc,
        "acc_vq_on_incremental_docs": accuracy(vq_inc, gold_inc) if n_inc else None,
        "incremental_agreement": accuracy(pred_inc, vq_inc) if n_inc else None,
        # incremental logits vs the per-chunk reference and vs the fresh (one-shot) VQ logits
        "max_abs_logit_diff_vs_reference": max_diff,
        "vq_dense_agreement": accuracy(pred_vq, pred_dense),
        "acc_vq_fast": accuracy(pred_fast, gold_inc) if pred_fast else None,
        "f1_vq_fast": macro_f1(pred_fast, gold_inc, n_labels) if pred_fast else None,
        "label_agreement_fast_vs_fresh": accuracy(pred_fast, vq_inc) if pred_fast else None,
        "max_abs_prob_diff_fast_vs_fresh": quantiles(prob_diff_fast),
        "fast_mode": fast.as_dict() if fast is not None else None,
        "max_doc_tokens": max_doc_tokens,
        "keep": keep,
        "labels": list(dataset.label_names),
        "seconds": round(time.time() - started, 1),
    }
    out.update(finetuned_metrics(finetuned, tokenizer, texts, gold, n_labels, max_doc_tokens,
                                 keep, progress))
    out["seconds"] = round(time.time() - started, 1)
    return out


def finetuned_metrics(finetuned: DenseFinetuned | None, tokenizer, texts: Sequence[str],
                      gold: Sequence[int], n_labels: int, max_doc_tokens: int | None, keep: str,
                      progress: bool = False) -> dict:
    """acc/f1_dense_finetuned on the same texts, cut at the fine-tuned model's chunk size."""
    if finetuned is None:
        return {"acc_dense_finetuned": None, "f1_dense_finetuned": None,
                "dense_finetuned": None}
    docs = chunk_documents(tokenizer, texts, ChunkPolicy(max_tokens=finetuned.chunk_tokens),
                           max_doc_tokens, keep)
    pred = [int(encoder_logits(finetuned.weights, finetuned.head, doc).argmax())
            for doc in tqdm(docs, desc="eval dense fine-tuned", disable=not progress)]
    return {"acc_dense_finetuned": accuracy(pred, gold),
            "f1_dense_finetuned": macro_f1(pred, gold, n_labels),
            "dense_finetuned": {"model": finetuned.manifest["name"],
                                "chunk_tokens": finetuned.chunk_tokens,
                                "trained": {k: finetuned.manifest["trained"].get(k) for k in
                                            ("device", "torch_threads", "seconds",
                                             "steps_run")}}}


def classify_text(model: VQModel, tokenizer, text: str, chunk_tokens: int = 256,
                  max_doc_tokens: int | None = None) -> dict:
    """One-shot VQ classification: label, softmax scores per label, and the raw logits."""
    doc = chunk_documents(tokenizer, [text], ChunkPolicy(max_tokens=chunk_tokens),
                          max_doc_tokens)[0]
    logits = vq_logits(model, doc)
    probs = torch.softmax(logits, -1)
    labels = model.head.labels or tuple(str(i) for i in range(len(logits)))
    return {"label": labels[int(logits.argmax())],
            "scores": {name: round(float(p), 6) for name, p in zip(labels, probs, strict=True)},
            "logits": [round(float(v), 6) for v in logits],
            "tokens": sum(doc.counts), "chunks": len(doc.chunks)}

"""`incstream train-adapted`: a VQ bundle whose encoder is adapted, for accuracy and stable codes.

`incstream train` keeps the encoder frozen: its codes were fitted with no pressure to stay still
when nearby text changes, and the fast mode pays for that in divergence from a fresh build.
This trainer adapts the encoder (engine.training.adapted_vq: rank-r adapters, biases and
LayerNorm) together with the codebooks and the head, on chunks as the engine cuts them, with:

- distillation from the fine-tuned dense teacher (`incstream train-dense`): its logits at
  temperature T and every block's output (mean squared error, averaged over the blocks), plus
  cross-entropy on the document's label;
- the fast mode's perturbations: every step trains on a batch of chunks x AND on x' = x after
  1-3 random edits (engine.training.edit_pairs) carrying the position ids the fast mode would
  give them (stable, duplicated where there is no room), the teacher seeing x' fresh (canonical
  positions): the student learns to answer from stable ids as a fresh build would;
- a stability objective on the pairs: for every row of x' away from the edit (same token, same
  position id as in x), |ctx'_l - sg(c_l(x))|^2 at every layer l, pulling its context onto the
  code it had before the edit; with the commitment term |ctx - sg(c)|^2 (contexts onto their
  codes) this moves contexts away from Voronoi boundaries, so codes stay put without hysteresis
  and held codes agree with a fresh build's;
- the VQ-VAE codebook term |sg(ctx) - c|^2, which keeps codes on their contexts as the encoder
  moves, and a code-usage term (engine.training.adapted_vq) against the collapse that pulling
  contexts onto codes invites.

Batches: `batch` training documents per step (a seeded permutation per epoch), one chunk drawn
from anywhere in each (engine.training.finetune_dense.step_chunks); the edits of a step come
from a generator seeded by (seed, step), so a step is a fixed function of (seed, step) and a
resumed run (checkpoint: parameters, AdamW state, losses, curve, best weights) is the same run.
AdamW, linear warmup then decay, gradient clipping; validation (whole documents, cut as `incstream
eval` cuts them, VQ answers) every `eval_every` steps keeps the best step. The bundle stores the
codebooks, the head, the adapter (engine.model.adapter, about 2 MB) and the manifest with the
training record; the dense probe's head is copied from the codebook bundle it started from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.model.adapter import ADAPTED_MATRICES, ADAPTER_FILE, WHOLE_FIELDS
from incstream.engine.model.base_model import DEFAULT_BASE_MODEL, base_model_path, load_tokenizer
from incstream.engine.model.codebooks import load_bundle
from incstream.engine.model.dense_finetuned import default_path, load_dense_finetuned
from incstream.engine.model.device import resolve_device
from incstream.engine.model.minilm import load_minilm
from incstream.engine.model.model_bundle import load_heads, read_manifest, save_model_bundle
from incstream.engine.training.adapted_vq import AdaptedVQ
from incstream.engine.training.checkpoints import checkpoint_dir, config_identity
from incstream.engine.training.dense_baseline import REFIT_L2_GRID, fit_dense_head
from incstream.engine.training.edit_pairs import EditedChunk, edit_chunk
from incstream.engine.training.finetune_dense import (
    better,
    document_vectors,
    load_checkpoint,
    load_docs,
    lr_factor,
    model_tensors,
    save_checkpoint,
    step_chunks,
    train_indices,
    validate,
)
from incstream.engine.training.labelled_datasets import LabelledDataset, load_dataset
from incstream.engine.training.train_data import chunk_documents, pad_chunks
from incstream.engine.training.trainable_minilm import encode_layers
from incstream.engine.training.vq_training import distillation_kl
from incstream.paths import bundles_dir, task_slug


@dataclass
class AdaptedConfig:
    dataset: str = "pang-lee-polarity"
    out: str | None = None  # default <data home>/bundles/<task>-minilm-vq<K>-adapted
    base_model: str = DEFAULT_BASE_MODEL
    teacher: str | None = None  # train-dense directory; default the task's default path
    init: str | None = None  # codebook/model bundle to start from; default <task>-minilm-vq64
    head_init: str = "init"  # "init": the init bundle's VQ head; "teacher": the teacher's head
    # after training: the VQ head refitted by logistic regression on the student's document
    # vectors (L2 picked on validation), as `incstream train --refit-head` does
    refit_head: bool = True
    chunk_tokens: int = 256
    train_max_doc_tokens: int | None = None
    eval_max_doc_tokens: int | None = 512
    eval_keep: str = "tail"
    train_docs: int | None = None
    steps: int = 300
    batch: int = 8  # documents (one chunk each) per step; each also trains as an edited pair
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4  # adapters, biases, LayerNorm
    lr_codebooks: float = 1e-3
    lr_head: float = 1e-3
    warmup: float = 0.1
    clip: float = 1.0
    w_ce: float = 1.0
    w_kd: float = 1.0
    temperature: float = 2.0
    w_hidden: float = 0.0
    w_codebook: float = 1.0
    # the shipped polarity-minilm-vq64-stable's weights: of 0.25/0.05, 1.0/0.25 and 4.0/0.5
    # (stability/commitment), the last gave the most reuse, the least divergence and the best
    # test accuracy (README, "Stability-trained bundle")
    w_commit: float = 0.5
    w_stability: float = 4.0
    w_usage: float = 1.0
    max_edits: int = 3
    shift_limit: int = 2  # as the fast mode's default (engine.incremental.fast_mode)
    eval_every: int = 100
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None

    def init_bundle(self) -> str:
        return self.init or f"{task_slug(self.dataset)}-minilm-vq64"

    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        k = load_bundle(self.init_bundle())[0].k
        return bundles_dir() / f"{task_slug(self.dataset)}-minilm-vq{k}-adapted"

    def teacher_path(self) -> Path:
        return Path(self.teacher) if self.teacher else default_path(self.dataset)

    def checkpoint_path(self) -> Path:
        return checkpoint_dir(self.checkpoint_dir, self.out_path().name)

    def identity(self) -> dict:
        return config_identity(self, ("out", "checkpoint_every", "checkpoint_dir", "device"))


@dataclass
class AdaptedResult:
    path: Path | None
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def pad_positions(positions: list[torch.Tensor], n: int) -> torch.Tensor:
    out = torch.zeros(len(positions), n, dtype=torch.long)
    for i, p in enumerate(positions):
        out[i, : len(p)] = p
    return out


def kept_index(edited: list[EditedChunk]) -> tuple[torch.Tensor, ...]:
    """(src batch row, src row, dst batch row, dst row) of every kept row of every pair: x is
    batch row b, x' batch row B + b."""
    b = len(edited)
    src_b = torch.cat([torch.full_like(e.kept_src, i) for i, e in enumerate(edited)])
    dst_b = src_b + b
    return (src_b, torch.cat([e.kept_src for e in edited]), dst_b,
            torch.cat([e.kept_dst for e in edited]))


def pair_loss(model: AdaptedVQ, teacher, teacher_head: tuple[torch.Tensor, torch.Tensor],
              chunks: list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator,
              cfg: AdaptedConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one step: the chunks and their edited versions in one padded batch."""
    dev = model.codebooks.device
    edited = [edit_chunk(c, gen, cfg.max_edits, cfg.shift_limit) for c in chunks]
    every = chunks + [e.ids for e in edited]
    ids, mask = pad_chunks(every)
    pos = pad_positions([torch.arange(len(c)) for c in chunks] + [e.positions for e in edited],
                        ids.shape[1])
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    with torch.no_grad():  # the teacher sees every text fresh: canonical positions
        t_layers = encode_layers(teacher, ids, mask)
        t_hidden = t_layers[-1]
        m = mask.unsqueeze(-1).to(t_hidden.dtype)
        t_logits = ((t_hidden * m).sum(1) / m.sum(1)) @ teacher_head[0].T + teacher_head[1]
    out = model.encode(ids, mask, pos)
    logits = model.head(out.pooled)
    labels2 = labels.repeat(2).to(dev)
    hidden = sum((((s - t) ** 2) * m).sum() for s, t in zip(out.layer_outputs, t_layers,
                                                            strict=True))
    hidden = hidden / (m.sum() * model.cfg.hidden * len(t_layers))
    src_b, src_r, dst_b, dst_r = (t.to(dev) for t in kept_index(edited))
    stability, same = torch.zeros((), device=dev), 0.0
    for ctx, codes, vectors in zip(out.contexts, out.codes, out.code_vectors, strict=True):
        moved = ctx[dst_b, dst_r] - vectors[src_b, src_r]  # (kept, H, d)
        stability = stability + (moved ** 2).sum(-1).mean() / len(out.contexts)
        same += float((codes[dst_b, dst_r] == codes[src_b, src_r]).float().mean())
    parts = {"ce": F.cross_entropy(logits, labels2),
             "kd": distillation_kl(logits, t_logits, cfg.temperature),
             "hidden": hidden, "codebook": out.codebook_loss, "commit": out.commitment_loss,
             "stability": stability, "usage": out.usage_loss}
    loss = (cfg.w_ce * parts["ce"] + cfg.w_kd * parts["kd"] + cfg.w_hidden * parts["hidden"]
            + cfg.w_codebook * parts["codebook"] + cfg.w_commit * parts["commit"]
            + cfg.w_stability * parts["stability"] + cfg.w_usage * parts["usage"])
    report = {k: float(v.detach()) for k, v in parts.items()}
    report["kept_codes_same"] = same / len(out.codes)
    return loss, report


def make_optimizer(model: AdaptedVQ, cfg: AdaptedConfig) -> torch.optim.AdamW:
    adapter = list(model.lora_a.values()) + list(model.lora_b.values())
    groups = [
        {"params": adapter, "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
        {"params": list(model.whole.values()), "lr": cfg.lr, "weight_decay": 0.0,
         "base_lr": cfg.lr},
        {"params": [model.codebooks], "lr": cfg.lr_codebooks, "weight_decay": 0.0,
         "base_lr": cfg.lr_codebooks},
        {"params": list(model.head.parameters()), "lr": cfg.lr_head, "weight_decay": 0.0,
         "base_lr": cfg.lr_head},
    ]
    return torch.optim.AdamW(groups)


def start_vq_head(cfg: AdaptedConfig, teacher_head: tuple[torch.Tensor, torch.Tensor],
                  n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head training starts from: the init bundle's VQ head, fitted to the very features
    the student starts with (so it starts at that bundle's accuracy; measured: from the
    teacher's head, fitted to other features, the student sat at chance for 100 steps), or the
    teacher's when the init bundle has no head for these labels."""
    try:
        vq_head, _ = load_heads(cfg.init_bundle())
    except (FileNotFoundError, ValueError):
        return teacher_head
    if vq_head.weight.shape[0] != n_labels or cfg.head_init == "teacher":
        return teacher_head
    dev = teacher_head[0].device
    return vq_head.weight.float().to(dev), vq_head.bias.float().to(dev)


def vq_pooled(model: AdaptedVQ):
    """(ids, mask) -> pooled: the quantized forward at canonical positions (validation)."""
    return lambda ids, mask: model.encode(ids, mask).pooled


def train_adapted(cfg: AdaptedConfig, dataset: LabelledDataset | None = None,
                  progress: bool = True, stop_after: int | None = None) -> AdaptedResult:
    started = time.time()
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    data = dataset if dataset is not None else load_dataset(cfg.dataset)
    tok = load_tokenizer(cfg.base_model)
    train_docs, y_train, val_docs, y_val = load_docs(cfg, data, tok)
    n_labels = len(data.label_names)
    teacher_path = cfg.teacher_path()
    if not (teacher_path / "manifest.json").exists():
        raise FileNotFoundError(f"no fine-tuned dense teacher at {teacher_path}: run "
                                f"`incstream train-dense --dataset {cfg.dataset}` first")
    tuned = load_dense_finetuned(teacher_path, dev)
    teacher_head = (tuned.head.weight.float().to(dev), tuned.head.bias.float().to(dev))
    base = load_minilm(base_model_path(cfg.base_model), torch.float32, dev)
    codebooks = load_bundle(cfg.init_bundle())[0].codes
    model = AdaptedVQ(base, codebooks.to(dev), n_labels, cfg.rank, cfg.alpha, cfg.seed).to(dev)
    start_head = start_vq_head(cfg, teacher_head, n_labels)
    with torch.no_grad():
        model.head.weight.copy_(start_head[0])
        model.head.bias.copy_(start_head[1])
    opt = make_optimizer(model, cfg)
    ckpt = cfg.checkpoint_path()
    meta = load_checkpoint(ckpt, model, opt, cfg) or {
        "config": cfg.identity(), "step": 0, "losses": [], "parts": [], "curve": [],
        "best": None, "stopped_early_at": None, "seconds": 0.0}
    seconds_before = meta["seconds"]
    if not meta["curve"]:
        meta["curve"].append({"step": 0, **validate(model, val_docs, y_val, n_labels,
                                                     vq_pooled(model)),
                              "seconds": 0.0})

    def record(step: int) -> None:
        meta["step"] = step
        meta["seconds"] = round(seconds_before + time.time() - started, 1)
        save_checkpoint(ckpt, model, opt, meta)

    bar = tqdm(range(meta["step"], cfg.steps), desc=f"train-adapted {data.name}",
               disable=not progress, initial=meta["step"], total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        pairs = step_chunks(step, train_docs, cfg)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step + 2)
        loss, parts = pair_loss(model, tuned.weights, teacher_head,
                                [train_docs[d].chunks[c] for d, c in pairs],
                                y_train[[d for d, _ in pairs]], gen, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        meta["losses"].append(float(loss.detach()))
        meta["parts"].append({k: round(v, 5) for k, v in parts.items()})
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            recent = meta["parts"][-cfg.eval_every:]
            point = {"step": done, **validate(model, val_docs, y_val, n_labels,
                                              vq_pooled(model)),
                     "train": {k: round(sum(p[k] for p in recent) / len(recent), 5)
                               for k in recent[-1]},
                     "seconds": round(seconds_before + time.time() - started, 1)}
            meta["curve"].append(point)
            if better(point, meta["best"]):
                meta["best"] = point
                ckpt.mkdir(parents=True, exist_ok=True)
                save_file(model_tensors(model), str(ckpt / "best.safetensors"))
        bar.set_postfix(loss=f"{meta['losses'][-1]:.3f}", kd=f"{parts['kd']:.3f}",
                        same=f"{parts['kept_codes_same']:.3f}",
                        best=f"{meta['best']['val_acc']:.3f}" if meta["best"] else "-")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_after:
            record(done)
        if done == stop_after:
            return AdaptedResult(None, meta["losses"], meta["curve"], {})
    if meta["best"] is not None:
        model.load_state_dict(load_file(str(ckpt / "best.safetensors")))
    if cfg.refit_head:
        meta["refit"] = refit_vq_head(model, cfg, data, tok, val_docs, y_val, progress)
    return write_bundle(cfg, data, model, meta, dev, len(train_docs), tuned.manifest)


def refit_vq_head(model: AdaptedVQ, cfg: AdaptedConfig, data: LabelledDataset, tok,
                  val_docs: list, y_val: torch.Tensor, progress: bool) -> dict:
    """Refit the head on the trained student's document vectors: the training documents cut
    as evaluation cuts them, logistic regression, L2 picked on validation."""
    train_split = data.split("train")
    policy = ChunkPolicy(max_tokens=cfg.chunk_tokens)
    idx = train_indices(cfg, len(train_split))
    docs = chunk_documents(tok, [train_split.texts[i] for i in idx], policy,
                           cfg.eval_max_doc_tokens, cfg.eval_keep)
    y_train = torch.tensor([train_split.labels[i] for i in idx])
    encode = vq_pooled(model)
    if progress:
        print(f"refit head: document vectors of {len(docs)} training documents", flush=True)
    x_train = document_vectors(model, docs, encode=encode)
    x_val = document_vectors(model, val_docs, encode=encode)
    before = validate(model, val_docs, y_val, len(data.label_names), encode)
    w, b, info = fit_dense_head(x_train.cpu(), y_train, x_val.cpu(), y_val,
                                len(data.label_names), REFIT_L2_GRID)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    after = validate(model, val_docs, y_val, len(data.label_names), encode)
    return {"l2": info["l2"], "grid": info["grid"], "before": before, "after": after}


def write_bundle(cfg: AdaptedConfig, data: LabelledDataset, model: AdaptedVQ, meta: dict,
                 dev: torch.device, n_train: int, teacher: dict) -> AdaptedResult:
    """The best-on-validation step (head refitted) as a model bundle with an adapter."""
    init_path, init_manifest = read_manifest(cfg.init_bundle())
    _, probe_head = load_heads(init_path)  # the dense probe of the base encoder, unchanged
    trained = {
        "what": "rank-r adapters on every block's six matrices, biases and LayerNorm, codebooks "
                "and the linear head; distilled from the fine-tuned dense model, on chunks and "
                "on edited chunks with the fast mode's stable position ids, with a code "
                "stability objective (engine.training.train_adapted)",
        "teacher": {"name": teacher.get("name"), "chunking": teacher.get("chunking")},
        "init_from": init_manifest.get("name"),
        "dense_head": "the linear probe of the base encoder, copied from init_from",
        "selection": "the step of the best validation accuracy (ties: lower cross-entropy), "
                     "evaluated every eval_every steps; the test split is never read here",
        "train_docs": n_train, "steps_run": len(meta["losses"]),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "seconds": meta["seconds"], "config": asdict(cfg), "curve": meta["curve"],
        "best": meta["best"], "head_refit": meta.get("refit")}
    c = model.cfg
    manifest = {
        "name": cfg.out_path().name, "base_model": cfg.base_model, "task": data.name,
        "labels": list(data.label_names),
        "vq": {"k": model.codebooks.shape[2], "layers": c.layers, "heads": c.heads,
               "head_dim": c.head_dim,
               "placement": "attention context softmax(QK^T/sqrt(d))V per head, before W_o"},
        "adapter": {"rank": cfg.rank, "alpha": cfg.alpha, "matrices": list(ADAPTED_MATRICES),
                    "whole": list(WHOLE_FIELDS), "file": ADAPTER_FILE},
        "chunking": {"chunk_tokens": cfg.chunk_tokens, "max_doc_tokens": cfg.eval_max_doc_tokens,
                     "keep": cfg.eval_keep,
                     "pooling": "token-count-weighted mean of chunk mean-pools"},
        "trained": trained,
        "dataset": {"name": data.name, "load": cfg.dataset, "licence": data.licence,
                    "source": data.source},
    }
    best = meta["best"] or meta["curve"][-1]
    final = meta["refit"]["after"] if meta.get("refit") else best
    manifest["metrics"] = {"validation": {"acc_vq": final["val_acc"], "f1_vq": final["val_f1"],
                                          "step": best["step"],
                                          "acc_vq_init": meta["curve"][0]["val_acc"]}}
    path = save_model_bundle(cfg.out_path(), model.codebooks, model.head.weight,
                             model.head.bias, probe_head.weight, probe_head.bias, manifest,
                             adapter=model.adapter_tensors())
    return AdaptedResult(path, meta["losses"], meta["curve"], trained)

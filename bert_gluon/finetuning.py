"""Fine-tune a pretrained BERT for sentence (pair) classification or regression, evaluate it,
and predict with it.

    finetune(FinetuneArgs(task="mrpc"))                         # → runs/mrpc/best/ checkpoint
    evaluate("runs/mrpc/best", task="mrpc", split="dev")        # → {"accuracy": ..., "f1": ...}
    predict("runs/mrpc/best", [("A man sings .", "A man is singing .")])

The output folder holds ``metrics.jsonl`` (one JSON line per log interval and per epoch),
``best/`` (the best epoch's checkpoint, loadable with ``from_pretrained``), ``last/`` (model,
optimizer moments and counters after the last finished epoch: ``resume=True`` continues
from there) and ``args.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from .data import (BERTDatasetTransform, ReadStats, get_task, make_dataloader, read_examples,
                   sampler_order, task_dir, transform_examples)
from .fileio import JsonlLogger, write_json
from .runtime import resolve_context, seed_everything
from .training import (WarmupLinearSchedule, amp_init_trainer, backward, create_trainer,
                       enable_amp, enable_bf16, load_training_state, optimizer_step,
                       save_training_state, set_grad_accumulation)

__all__ = ["FinetuneArgs", "finetune", "evaluate", "predict", "classification_metrics",
           "regression_metrics", "predict_scores", "load_data"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


@dataclass
class FinetuneArgs:
    """Everything a fine-tuning run needs. Defaults are the benchmark recipe on MRPC."""

    task: Optional[str] = "mrpc"            # a built-in task, or None with train_file/dev_file
    data_dir: Optional[str] = None          # folder of the task's files (else env / shared / cache)
    train_file: Optional[str] = None        # any TSV/CSV (overrides the task's train file)
    dev_file: Optional[str] = None
    text_columns: Optional[Sequence[str]] = None   # one or two header names or 0-based indices
    label_column: Optional[str] = None
    class_labels: Optional[Sequence[str]] = None   # None with regression=True
    regression: bool = False
    model: str = DEFAULT_MODEL              # model name or checkpoint folder
    pooling: Optional[str] = None           # "cls" / "mean"; None: "cls" (ours: its own)
    output_dir: str = "runs/mrpc"
    epochs: int = 3
    batch_size: int = 32
    max_len: int = 128
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    optimizer: str = "adamw"               # bias-corrected, as torch.optim.AdamW (HF recipe)
    adam_epsilon: float = 1e-8              # torch.optim.AdamW's default (BERT used 1e-6)
    max_grad_norm: Optional[float] = 1.0
    accumulate: int = 1
    seed: int = 1
    num_buckets: int = 10
    log_interval: int = 20                  # updates between loss logs (the only host syncs)
    early_stopping: Optional[int] = None    # stop after this many epochs without improvement
    resume: bool = False
    max_train_examples: Optional[int] = None    # use only the first N training examples
    max_dev_examples: Optional[int] = None
    skip_bad: bool = False                  # skip (and count) bad rows instead of failing
    amp: bool = True                        # fp16 on GPU (no effect on CPU)
    bf16: bool = False                      # CPU: encoder dense layers in bfloat16 (AVX-512 BF16)
    eval_batch_size: int = 64
    progress: bool = True

    def resolved(self) -> "FinetuneArgs":
        """Fill text/label columns and class labels from the task when not given."""
        changes: Dict[str, Any] = {}
        if self.task:
            spec = get_task(self.task)
            if self.text_columns is None:
                changes["text_columns"] = list(spec.text_columns)
            if self.label_column is None:
                changes["label_column"] = spec.label_column
            if self.class_labels is None and not self.regression:
                changes["class_labels"] = list(spec.class_labels)
        elif not (self.train_file and self.dev_file):
            raise ValueError("give a task or both train_file and dev_file")
        args = dataclasses.replace(self, **changes)
        if args.text_columns is None or args.label_column is None:
            raise ValueError("text_columns and label_column are needed for a data file")
        if args.class_labels is None and not args.regression:
            raise ValueError("give class_labels (classification) or regression=True")
        for name in ("epochs", "batch_size", "accumulate", "log_interval", "num_buckets"):
            if getattr(args, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
        return args


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
def classification_metrics(labels: Sequence[int], preds: Sequence[int],
                           positive: int = 1) -> Dict[str, float]:
    """Accuracy, and precision / recall / F1 of the ``positive`` class, over the whole set."""
    labels, preds = np.asarray(labels).astype(int), np.asarray(preds).astype(int)
    if labels.shape != preds.shape or labels.size == 0:
        raise ValueError(f"labels {labels.shape} and predictions {preds.shape} must be equal "
                         f"and non-empty")
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float(np.mean(labels == preds)), "f1": f1, "precision": precision,
            "recall": recall, "n": int(labels.size)}


def regression_metrics(targets: Sequence[float], preds: Sequence[float]) -> Dict[str, float]:
    """Mean squared error and Pearson correlation."""
    t, p = np.asarray(targets, dtype=np.float64), np.asarray(preds, dtype=np.float64)
    pearson = float(np.corrcoef(t, p)[0, 1]) if t.size > 1 and t.std() and p.std() else 0.0
    return {"mse": float(np.mean((t - p) ** 2)), "pearson": pearson, "n": int(t.size)}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def load_data(args: FinetuneArgs, split: str) -> Tuple[List[tuple], ReadStats]:
    """Raw examples of ``split`` (``train``/``dev``) for ``args`` (a task or files)."""
    path = args.train_file if split == "train" else args.dev_file
    if path is None:
        spec = get_task(args.task)
        path = os.path.join(task_dir(spec, args.data_dir), spec.files[split])
    stats = ReadStats(path)
    examples = read_examples(path, args.text_columns, args.label_column,
                             None if args.regression else args.class_labels,
                             skip_bad=args.skip_bad, stats=stats)
    limit = args.max_train_examples if split == "train" else args.max_dev_examples
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples, stats


def predict_scores(model: gluon.Block, samples: Sequence[tuple], pad_id: int, ctx: mx.Context,
                   batch_size: int = 64, has_label: bool = True,
                   regression: bool = False) -> np.ndarray:
    """Model outputs ``(N, num_classes)`` for transformed ``samples``, in their order.

    Batches are length-bucketed (no shuffle) and put back in order; the host reads the
    outputs once, at the end.
    """
    loader = make_dataloader(samples, batch_size, pad_id, shuffle=False, has_label=has_label,
                             regression=regression)
    outs = []
    for batch in loader:
        words, valid_length, segments = (x.as_in_context(ctx) for x in batch[:3])
        outs.append(model(words, segments, valid_length))
    scores = mx.nd.concat(*outs, dim=0).asnumpy()
    ordered = np.empty_like(scores)
    ordered[np.array(sampler_order(loader))] = scores
    return ordered


def _score(scores: np.ndarray, labels: np.ndarray, regression: bool,
           positive: int) -> Dict[str, float]:
    if regression:
        return regression_metrics(labels, scores[:, 0])
    return classification_metrics(labels, scores.argmax(axis=1), positive)


def _positive_index(class_labels: Optional[Sequence[str]]) -> int:
    if class_labels is None:
        return 1
    labels = [str(c) for c in class_labels]
    return labels.index("1") if "1" in labels else len(labels) - 1


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def finetune(args: FinetuneArgs, ctx: Optional[mx.Context] = None) -> Dict[str, Any]:
    """Fine-tune ``args.model`` on ``args``' data; returns the run's summary (best epoch,
    its dev metrics, training time). See the module docstring for the output folder."""
    from tqdm.auto import tqdm

    from .checkpoints import from_pretrained, save_pretrained

    args = args.resolved()
    ctx = resolve_context(ctx)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "args.json"), dataclasses.asdict(args))
    use_amp = args.amp and enable_amp(ctx)

    seed_everything(args.seed)
    num_classes = 1 if args.regression else len(args.class_labels)
    model, tokenizer = from_pretrained(args.model, task="classifier", num_classes=num_classes,
                                       ctx=ctx, pooling=args.pooling)
    pair = len(args.text_columns) == 2
    labels = None if args.regression else list(args.class_labels)
    positive = _positive_index(labels)
    transform = BERTDatasetTransform(tokenizer, args.max_len, labels, has_label=True, pad=False,
                                     pair=pair)
    train_raw, train_stats = load_data(args, "train")
    dev_raw, dev_stats = load_data(args, "dev")
    train = transform_examples(train_raw, transform, "tokenizing train", args.progress)
    train_truncated = transform.num_truncated
    dev = transform_examples(dev_raw, transform, "tokenizing dev", args.progress)
    dev_labels = np.array([s[3] for s in dev])
    logger = JsonlLogger(os.path.join(out, "metrics.jsonl"))
    logger.log(event="model", model=args.model, pooling=model.pooling,
               num_classes=num_classes)
    logger.log(event="data", train=len(train), dev=len(dev), train_skipped=train_stats.skipped,
               dev_skipped=dev_stats.skipped, train_truncated=train_truncated,
               dev_truncated=transform.num_truncated - train_truncated)
    if train_stats.skipped or dev_stats.skipped or transform.num_truncated:
        print(f"data: skipped {train_stats.skipped} train / {dev_stats.skipped} dev rows; "
              f"truncated {train_truncated} train / {transform.num_truncated - train_truncated} "
              f"dev examples to max_len={args.max_len}")

    if args.bf16:
        enable_bf16(model, ctx)
    model.hybridize(static_alloc=True)
    loss_fn = gluon.loss.L2Loss() if args.regression else gluon.loss.SoftmaxCELoss()
    loss_fn.hybridize(static_alloc=True)
    trainer = create_trainer(model, args.optimizer, args.lr, args.weight_decay,
                             epsilon=args.adam_epsilon)
    if use_amp:
        amp_init_trainer(trainer)
    set_grad_accumulation(model, args.accumulate)

    batches_per_epoch = len(make_dataloader(train, args.batch_size, tokenizer.pad_id, True,
                                            args.num_buckets))
    updates_per_epoch = math.ceil(batches_per_epoch / args.accumulate)
    schedule = WarmupLinearSchedule.from_ratio(args.lr, updates_per_epoch * args.epochs,
                                               args.warmup_ratio)
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0,
             "train_time": 0.0}
    last_dir, best_dir = os.path.join(out, "last"), os.path.join(out, "best")
    if args.resume:
        meta = load_training_state(last_dir, trainer, model, ctx)
        if meta is not None:
            state.update(meta)
            print(f"resuming after epoch {state['epoch']} (update {state['step']})")
    select = "pearson" if args.regression else "accuracy"

    for epoch in range(state["epoch"], args.epochs):
        if args.early_stopping and state["bad_epochs"] >= args.early_stopping:
            break
        seed_everything(args.seed * 1000 + epoch)   # each epoch's shuffle and dropout are fixed
        loader = make_dataloader(train, args.batch_size, tokenizer.pad_id, True, args.num_buckets,
                                 regression=args.regression)
        tic = time.time()
        loss_sum, loss_count, pending = mx.nd.zeros((1,), ctx=ctx), 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.progress,
                   mininterval=1.0)
        for i, (words, valid_length, segments, label) in enumerate(bar):
            words, valid_length, segments, label = (x.as_in_context(ctx) for x in
                                                    (words, valid_length, segments, label))
            with autograd.record():
                scores = model(words, segments, valid_length)
                loss = loss_fn(scores, label).mean()
            backward(loss, trainer)
            loss_sum += loss.detach()
            loss_count += 1
            pending += 1
            if pending == args.accumulate or i == len(loader) - 1:
                state["step"] += 1
                trainer.set_learning_rate(schedule(state["step"]))
                optimizer_step(trainer, args.max_grad_norm, pending)
                pending = 0
                if state["step"] % args.log_interval == 0:   # the only host sync in the loop
                    avg = float(loss_sum.asscalar()) / loss_count
                    loss_sum[:] = 0
                    loss_count = 0
                    bar.set_postfix(loss=f"{avg:.4f}", lr=f"{trainer.learning_rate:.2e}")
                    logger.log(event="train", epoch=epoch + 1, step=state["step"], loss=avg,
                               lr=trainer.learning_rate)
        mx.nd.waitall()
        epoch_time = time.time() - tic
        state["train_time"] += epoch_time
        if loss_count:
            logger.log(event="train", epoch=epoch + 1, step=state["step"],
                       loss=float(loss_sum.asscalar()) / loss_count, lr=trainer.learning_rate)

        scores = predict_scores(model, dev, tokenizer.pad_id, ctx, args.eval_batch_size,
                                regression=args.regression)
        metrics = _score(scores, dev_labels, args.regression, positive)
        logger.log(event="dev", epoch=epoch + 1, step=state["step"], epoch_time=epoch_time,
                   **metrics)
        print(f"epoch {epoch + 1}: dev " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                     if k != "n") + f" ({epoch_time:.0f}s)")
        if state["best"] is None or metrics[select] > state["best"][select]:
            state.update(best=metrics, best_epoch=epoch + 1, bad_epochs=0)
            save_pretrained(model, tokenizer, best_dir, class_labels=labels,
                            task=args.task, max_len=args.max_len, pair=pair,
                            text_columns=list(args.text_columns), label_column=args.label_column,
                            epoch=epoch + 1, dev_metrics=metrics)
        else:
            state["bad_epochs"] += 1
        state["epoch"], state["last"] = epoch + 1, metrics
        save_training_state(last_dir, trainer, model, **state)

    summary = {"best_epoch": state["best_epoch"], "dev": state["best"],
               "last_dev": state.get("last"),
               "train_time": state["train_time"], "epochs_run": state["epoch"],
               "checkpoint": best_dir}
    logger.log(event="done", **summary)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


# --------------------------------------------------------------------------------------
# Evaluation and prediction with a saved checkpoint
# --------------------------------------------------------------------------------------
def _load_checkpoint(checkpoint: str, ctx: mx.Context, int8: bool = False,
                     calib_file: Optional[str] = None, data_dir: Optional[str] = None,
                     int8_backend: str = "auto", bf16: bool = False):
    """The fine-tuned model, its tokenizer and ``config.json``; with ``int8`` the model is
    quantized on the CPU by ``int8_backend`` (oneDNN's is calibrated on a few hundred of its
    training examples: the checkpoint's task, or ``calib_file``), with ``bf16`` its dense
    layers run in bfloat16 -- see :mod:`bert_gluon.quantization`."""
    from .checkpoints import from_pretrained

    if int8 and bf16:
        raise ValueError("choose one of int8 and bf16, not both")
    if (int8 or bf16) and ctx.device_type != "cpu":
        raise ValueError(f"{'int8' if int8 else 'bf16'} inference runs on the CPU only, "
                         f"not {ctx}")
    model, tokenizer = from_pretrained(checkpoint, task="classifier", ctx=ctx)
    meta = getattr(model, "meta", {}) or {}
    if "class_labels" not in meta:
        raise ValueError(f"{checkpoint}: not a fine-tuned checkpoint (config.json has no "
                         f"class_labels); run finetune first")
    labels = meta["class_labels"]
    want = 1 if labels is None else len(labels)
    if model.num_classes != want:
        raise ValueError(f"{checkpoint}: classifier has {model.num_classes} outputs but "
                         f"config.json lists {want} class labels {labels}")
    model.hybridize(static_alloc=True)
    if int8:
        from .quantization import quantize_checkpoint_model

        model = quantize_checkpoint_model(model, tokenizer, meta, train_file=calib_file,
                                          data_dir=data_dir, backend=int8_backend, ctx=ctx)
    elif bf16:
        from .quantization import bf16_dense_layers

        model = bf16_dense_layers(model)
    return model, tokenizer, meta


def evaluate(checkpoint: str, task: Optional[str] = None, split: str = "dev",
             file: Optional[str] = None, data_dir: Optional[str] = None,
             predictions: Optional[str] = None, batch_size: int = 64, skip_bad: bool = False,
             int8: bool = False, calib_file: Optional[str] = None, int8_backend: str = "auto",
             bf16: bool = False, ctx: Optional[mx.Context] = None) -> Dict[str, float]:
    """Accuracy and F1 (or MSE and Pearson) of ``checkpoint`` on a labelled split or file.

    Columns and labels come from the checkpoint (what it was fine-tuned on). ``predictions``:
    also write one ``label<TAB>probability`` line per example (TSV with a header).
    ``int8``: score with the INT8-quantized model (CPU; ``int8_backend`` as in
    :func:`bert_gluon.quantization.quantize_classifier`; oneDNN's is calibrated on the
    checkpoint's training data, or ``calib_file``). ``bf16``: with the encoder's dense layers
    in bfloat16 (CPU; :func:`bert_gluon.quantization.bf16_dense_layers`).
    """
    ctx = resolve_context(ctx)
    model, tokenizer, meta = _load_checkpoint(checkpoint, ctx, int8, calib_file, data_dir,
                                              int8_backend, bf16)
    labels = meta["class_labels"]
    task = task or meta.get("task")
    if file is None:
        if not task:
            raise ValueError("give a task or a file to evaluate on")
        spec = get_task(task)
        if labels is not None and len(spec.class_labels) != len(labels):
            raise ValueError(f"{checkpoint}: {len(labels)} classes, task {spec.name} has "
                             f"{len(spec.class_labels)}")
        file = os.path.join(task_dir(spec, data_dir), spec.files[split])
    examples = read_examples(file, meta["text_columns"], meta["label_column"], labels,
                             skip_bad=skip_bad)
    transform = BERTDatasetTransform(tokenizer, int(meta["max_len"]), labels, pad=False,
                                     pair=bool(meta["pair"]))
    samples = transform_examples(examples, transform)
    scores = predict_scores(model, samples, tokenizer.pad_id, ctx, batch_size,
                            regression=labels is None)
    gold = np.array([s[3] for s in samples])
    metrics = _score(scores, gold, labels is None, _positive_index(labels))
    metrics["truncated"] = transform.num_truncated
    if predictions:
        _write_predictions(predictions, scores, labels)
    return metrics


def predict(checkpoint: str, inputs: Sequence[Sequence[str]], batch_size: int = 64,
            int8: bool = False, calib_file: Optional[str] = None,
            data_dir: Optional[str] = None, int8_backend: str = "auto", bf16: bool = False,
            ctx: Optional[mx.Context] = None) -> List[Dict[str, Any]]:
    """Label and probability for each input (a sentence, or a ``(sentence_a, sentence_b)``
    pair, matching what the checkpoint was trained on). ``int8``, ``int8_backend``, ``bf16``:
    as in :func:`evaluate`."""
    ctx = resolve_context(ctx)
    model, tokenizer, meta = _load_checkpoint(checkpoint, ctx, int8, calib_file, data_dir,
                                              int8_backend, bf16)
    labels, pair = meta["class_labels"], bool(meta["pair"])
    rows = [(x,) if isinstance(x, str) else tuple(x) for x in inputs]
    for i, row in enumerate(rows):
        if len(row) != (2 if pair else 1) or not all(str(t).strip() for t in row):
            want = "two non-empty sentences" if pair else "one non-empty sentence"
            raise ValueError(f"input {i + 1}: expected {want}, got {row!r}")
    transform = BERTDatasetTransform(tokenizer, int(meta["max_len"]), labels, has_label=False,
                                     pad=False, pair=pair)
    samples = [transform(r) for r in rows]
    scores = predict_scores(model, samples, tokenizer.pad_id, ctx, batch_size, has_label=False)
    return _rows(scores, labels)


def predict_file(checkpoint: str, file: str, output: Optional[str] = None,
                 text_columns: Optional[Sequence[str]] = None, skip_bad: bool = False,
                 int8: bool = False, calib_file: Optional[str] = None,
                 data_dir: Optional[str] = None, int8_backend: str = "auto",
                 bf16: bool = False, ctx: Optional[mx.Context] = None) -> List[Dict[str, Any]]:
    """:func:`predict` for every row of a TSV/CSV file (labels, if any, are ignored);
    ``output`` gets the predictions as TSV."""
    ctx = resolve_context(ctx)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    cols = text_columns or meta.get("text_columns")
    examples = read_examples(file, cols, None, None, skip_bad=skip_bad)
    results = predict(checkpoint, examples, int8=int8, calib_file=calib_file,
                      data_dir=data_dir, int8_backend=int8_backend, bf16=bf16, ctx=ctx)
    if output:
        _write_rows(output, results)
    return results


def _rows(scores: np.ndarray, labels: Optional[Sequence[str]]) -> List[Dict[str, Any]]:
    if labels is None:
        return [{"label": float(s[0]), "probability": None} for s in scores]
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [{"label": str(labels[int(p.argmax())]), "probability": float(p.max())}
            for p in probs]


def _write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("label\tprobability\n")
            for r in rows:
                prob = "" if r["probability"] is None else f"{r['probability']:.6f}"
                f.write(f"{r['label']}\t{prob}\n")


def _write_predictions(path: str, scores: np.ndarray, labels: Optional[Sequence[str]]) -> None:
    _write_rows(path, _rows(scores, labels))

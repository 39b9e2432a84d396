"""Pre-training BERT: masked LM + next-sentence prediction, with checkpoints that resume.

    batch ──► BERTForPretraining ──► mlm_scores (B, P, V), nsp_scores (B, 2)
          ──► PretrainingLoss: MLM cross-entropy over the real prediction slots + NSP CE
          ──► backward ──► all-reduce (kvstore) ──► clip ──► update   (bert_gluon.training)

:func:`pretrain` is the loop. Every ``checkpoint_every`` updates it writes, atomically,
the parameters, the optimizer state, the step, the data position ``(epoch, batch)`` and the
RNG state; ``resume=True`` continues from there and ends with exactly the parameters an
uninterrupted run would have. Exactness comes from making every random choice a function
of ``(seed, position)``: the batch order of an epoch from ``(seed, epoch)``, dynamic masks
from ``(seed, epoch)``, and dropout from MXNet's generator re-seeded with
``(seed, micro-batch number)`` before every forward pass (MXNet's RNG state cannot be read
back, so it is re-created instead of saved).

Scale-out uses MXNet's own machinery: several devices in one machine through the
``device`` kvstore (``ctx=[mx.gpu(0), mx.gpu(1)]``), several machines through the
``dist_sync`` kvstore (launch commands in ``docs/pretraining.md``), fp16 with dynamic loss
scaling through MXNet AMP on GPU (``fp16=True``; not exercised by the CPU-only tests).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from . import training
from .fileio import JsonlLogger, write_json
from .ops import softmax_cross_entropy
from .pretraining_data import PretrainingData, iterate_batches, num_batches
from .runtime import check_gpu

__all__ = ["PretrainingLoss", "PretrainingMetrics", "evaluate", "most_frequent_token_baseline",
           "word_overlap_nsp_baseline", "baselines", "evaluate_checkpoint", "pretrain",
           "build_pretraining_model", "run_pretraining", "default_vocab"]

Context = Union[mx.Context, Sequence[mx.Context]]


class PretrainingLoss(HybridBlock):
    """``loss = MLM cross-entropy (mean over real prediction slots) + NSP cross-entropy``.

    ``forward(mlm_scores (B, P, V), nsp_scores (B, 2), masked_ids (B, P),
    masked_weights (B, P), nsp_label (B,))`` returns ``(loss, mlm_loss, nsp_loss)``.
    Padding slots (weight 0) contribute nothing.
    """

    def hybrid_forward(self, F, mlm_scores, nsp_scores, masked_ids, masked_weights, nsp_label):
        mlm_nll = softmax_cross_entropy(F, mlm_scores, masked_ids)                  # (B, P)
        mlm = F.sum(mlm_nll * masked_weights) / (F.sum(masked_weights) + 1e-6)
        nsp = F.mean(-F.pick(F.log_softmax(nsp_scores, axis=-1), nsp_label, axis=-1))
        return mlm + nsp, mlm, nsp


class PretrainingMetrics:
    """Running MLM/NSP accuracy and loss, kept as device arrays until :meth:`result`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, Any] = {}
        self.batches = 0

    def _add(self, key: str, value) -> None:
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def update(self, mlm_scores, nsp_scores, batch, mlm_loss, nsp_loss) -> None:
        w = batch["masked_weights"]
        self._add("mlm_correct", ((mlm_scores.argmax(axis=-1) == batch["masked_ids"]) * w).sum())
        self._add("mlm_count", w.sum())
        self._add("nsp_correct", (nsp_scores.argmax(axis=-1) == batch["nsp_label"]).sum())
        self._add("nsp_count", mx.nd.array([nsp_scores.shape[0]], ctx=nsp_scores.context))
        self._add("mlm_loss", mlm_loss)
        self._add("nsp_loss", nsp_loss)
        self.batches += 1

    def result(self) -> Dict[str, float]:
        if not self.batches:
            return {}
        s = {k: float(v.asscalar()) for k, v in self._sums.items()}
        return {"mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1.0),
                "nsp_acc": s["nsp_correct"] / max(s["nsp_count"], 1.0),
                "mlm_loss": s["mlm_loss"] / self.batches, "nsp_loss": s["nsp_loss"] / self.batches}


def _to_nd(batch: Dict[str, np.ndarray], ctx: mx.Context) -> Dict[str, mx.nd.NDArray]:
    return {k: mx.nd.array(v, ctx=ctx, dtype="float32") for k, v in batch.items()}


def _forward(model, loss_fn, nd: Dict[str, mx.nd.NDArray]):
    _, mlm_scores, nsp_scores = model(nd["input_ids"], nd["segment_ids"], nd["valid_length"],
                                      nd["masked_positions"])
    loss, mlm, nsp = loss_fn(mlm_scores, nsp_scores, nd["masked_ids"], nd["masked_weights"],
                             nd["nsp_label"])
    return loss, mlm, nsp, mlm_scores, nsp_scores


def evaluate(model, arrays: Dict[str, np.ndarray], batch_size: int = 64,
             ctx: Optional[mx.Context] = None) -> Dict[str, float]:
    """MLM accuracy/loss over every masked slot and NSP accuracy/loss over every pair of
    ``arrays`` (dropout off)."""
    ctx = ctx or mx.cpu()
    loss_fn = PretrainingLoss()
    metrics = PretrainingMetrics()
    for _, batch in iterate_batches(arrays, batch_size, shuffle=False, drop_last=False):
        nd = _to_nd(batch, ctx)
        _, mlm, nsp, mlm_scores, nsp_scores = _forward(model, loss_fn, nd)
        metrics.update(mlm_scores, nsp_scores, nd, mlm, nsp)
    return metrics.result()


def most_frequent_token_baseline(train: Dict[str, np.ndarray],
                                 held_out: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """MLM accuracy of always predicting the token most often masked in ``train``, measured
    on ``held_out``; and NSP accuracy of always predicting the majority label."""
    labels = train["masked_ids"][train["masked_weights"] > 0]
    token = int(np.bincount(labels).argmax())
    eval_labels = held_out["masked_ids"][held_out["masked_weights"] > 0]
    nsp_major = int(np.bincount(train["nsp_label"], minlength=2).argmax())
    return {"token_id": token, "mlm_acc": float(np.mean(eval_labels == token)),
            "nsp_acc": float(np.mean(held_out["nsp_label"] == nsp_major))}


def _segment_token_sets(arrays: Dict[str, np.ndarray]) -> List[tuple]:
    """``(set of A's token ids, set of B's)`` per pair, with masked tokens put back."""
    ids = np.array(arrays["input_ids"], copy=True)
    if "masked_positions" in arrays:
        rows, slots = np.nonzero(arrays["masked_weights"] > 0)
        ids[rows, arrays["masked_positions"][rows, slots]] = arrays["masked_ids"][rows, slots]
    pairs = []
    for row, seg, n in zip(ids, arrays["segment_ids"], arrays["valid_length"]):
        row, seg = row[:int(n)], seg[:int(n)]
        a, b = row[seg == 0][1:-1], row[seg == 1][:-1]      # drop [CLS] and the two [SEP]
        pairs.append((set(a.tolist()), set(b.tolist())))
    return pairs


def word_overlap_nsp_baseline(train: Dict[str, np.ndarray],
                              held_out: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """NSP without a network: is B the next segment because it repeats A's words?

    A pair's score is the rarity-weighted number of WordPiece types A and B share,
    ``sum(idf(t) for t in A & B) / sqrt(|A| |B|)`` with ``idf(t) = log(N / (1 + df(t)))``
    over the ``N`` training segments; pairs above a threshold are called "next". The
    threshold is the one most accurate on ``train``; the accuracy that counts is on
    ``held_out``. A model below it tells next segments from random ones worse than
    "does B repeat A's rarer words?" does.
    """
    from collections import Counter

    train_pairs = _segment_token_sets(train)
    df: Counter = Counter()                  # in how many training segments each token is
    for a, b in train_pairs:
        df.update(a)
        df.update(b)
    n_segments = 2 * len(train_pairs)

    def scores(pairs):
        return np.array([sum(np.log(n_segments / (1.0 + df.get(t, 0))) for t in a & b)
                         / np.sqrt(max(len(a) * len(b), 1)) for a, b in pairs])

    s, y = scores(train_pairs), np.asarray(train["nsp_label"])
    values, inverse = np.unique(s, return_inverse=True)
    random_at = np.bincount(inverse, weights=(y == 0), minlength=len(values))
    next_at = np.bincount(inverse, weights=(y == 1), minlength=len(values))
    # threshold values[k]: "random" for scores <= values[k], "next" above; -inf: all "next"
    values = np.concatenate([[-np.inf], values])
    correct = np.concatenate([[0.0], np.cumsum(random_at)]) + (
        next_at.sum() - np.concatenate([[0.0], np.cumsum(next_at)]))
    k = int(np.argmax(correct))
    held = scores(_segment_token_sets(held_out))
    held_next = np.asarray(held_out["nsp_label"]) == 1
    return {"threshold": float(values[k]), "train_nsp_acc": float(correct[k] / len(y)),
            "nsp_acc": float(np.mean((held > values[k]) == held_next))}


def baselines(train: Dict[str, np.ndarray], held_out: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Both baselines of a held-out set, fitted on the training data: what a pre-trained
    model's MLM and NSP accuracy should be compared with."""
    return {"baseline_most_frequent_token": most_frequent_token_baseline(train, held_out),
            "baseline_word_overlap_nsp": word_overlap_nsp_baseline(train, held_out)}


def _check_data_fits(model, meta: Dict[str, Any], folder: str) -> None:
    """A clear error when a data folder was made for another vocabulary or is too long."""
    if meta["vocab_size"] != model.config.vocab_size:
        raise ValueError(f"{folder}: data was made with a {meta['vocab_size']}-token "
                         f"vocabulary, the model has {model.config.vocab_size}")
    if meta["max_seq_length"] > model.config.max_length:
        raise ValueError(f"{folder}: sequences of {meta['max_seq_length']} tokens exceed the "
                         f"model's max_length {model.config.max_length}")


def evaluate_checkpoint(checkpoint: str, data: str, train_data: Optional[str] = None,
                        max_pairs: int = 2048, batch_size: int = 64,
                        ctx: Optional[mx.Context] = None) -> Dict[str, Any]:
    """What ``bert-gluon evaluate-pretraining`` prints: :func:`evaluate` of a pre-trained
    checkpoint (``<output_dir>/final`` or any ``save_pretrained`` folder with MLM/NSP heads)
    on the first ``max_pairs`` pairs of a static data folder; with ``train_data``, the folder
    it was trained on, also both baselines of that data."""
    from .checkpoints import from_pretrained
    from .pretraining_data import load_shards

    ctx = ctx or mx.cpu()
    model, _ = from_pretrained(checkpoint, task="pretraining", ctx=ctx)
    arrays, meta = load_shards(data)
    _check_data_fits(model, meta, data)
    arrays = {k: v[:max_pairs] for k, v in arrays.items()}
    result: Dict[str, Any] = dict(evaluate(model, arrays, batch_size, ctx),
                                  pairs=int(len(arrays["valid_length"])))
    if train_data:
        result.update(baselines(load_shards(train_data)[0], arrays))
    return result


def build_pretraining_model(config=None, init_from: Optional[str] = None,
                            ctx: Context = None, seed: int = 0):
    """A ``BERTForPretraining`` from scratch (``config``), or continued from a checkpoint
    loaded with :func:`bert_gluon.checkpoints.from_pretrained` (missing MLM/NSP heads are
    created fresh; the MLM output weight is tied to the word embedding). Returns
    ``(model, tokenizer or None)``."""
    from .model import BERTForPretraining

    ctxs = _ctx_list(ctx)
    training.seed_everything(seed)
    if init_from:
        from .checkpoints import from_pretrained

        model, tokenizer = from_pretrained(init_from, task="pretraining", ctx=ctxs[0])
        if len(ctxs) > 1:
            model.collect_params().reset_ctx(ctxs)
        return model, tokenizer
    if config is None:
        raise ValueError("give a config (training from scratch) or init_from (a checkpoint)")
    model = BERTForPretraining(config)
    model.initialize(ctx=ctxs)
    return model, None


def _ctx_list(ctx: Context) -> List[mx.Context]:
    if ctx is None:
        return [mx.cpu()]
    return list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]


def _schedule_step(step: int, total_steps: int, t_start: float,
                   max_seconds: Optional[float]) -> int:
    """The step the learning-rate schedule sees: the real one, or, under a wall-time budget,
    the budget's elapsed share of ``total_steps`` when that is further along (so the rate
    still reaches 0 at the deadline on a machine slower than planned)."""
    if max_seconds is None:
        return step
    by_time = int(total_steps * (time.time() - t_start) / max_seconds)
    return min(total_steps, max(step, by_time))


def _sync_parameters(trainer, kv, key_base: int = 1 << 20) -> None:
    """Give every distributed worker rank 0's parameters before the first step.

    The ``Trainer``'s own initial broadcast in MXNet 1.9.1 can leave a worker with a wrong
    copy of the *last* parameter (rank 0's initial push races the barrier; seen in
    tests/test_distributed.py). So: let the trainer initialise its store, then push every
    parameter once more under separate keys, wait for the pushes, barrier, pull, barrier.
    """
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    params = trainer._params
    for i, p in enumerate(params):
        kv.init(key_base + i, p.data())
    mx.nd.waitall()
    kv._barrier()
    for i, p in enumerate(params):
        kv.pull(key_base + i, out=p.list_data())
    mx.nd.waitall()
    kv._barrier()


def _rng_seed(seed: int, counter: int) -> int:
    return (seed * 1_000_003 + counter) % (2 ** 31 - 1)


def pretrain(model, train_data: PretrainingData, output_dir: str, *,
             eval_arrays: Optional[Dict[str, np.ndarray]] = None, tokenizer=None,
             batch_size: int = 32, accumulate: int = 1, total_steps: int = 1000,
             learning_rate: float = 1e-4, warmup_ratio: float = 0.01, optimizer: str = "bertadam",
             weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, seed: int = 0,
             checkpoint_every: int = 500, eval_every: int = 0, log_every: int = 50,
             max_seconds: Optional[float] = None, stop_after: Optional[int] = None,
             resume: bool = False, ctx: Context = None, kvstore: Any = "device",
             fp16: bool = False, bf16: bool = False, ema_decay: Optional[float] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Train ``model`` (a :class:`BERTForPretraining`, initialised) on ``train_data``.

    One *step* is one optimizer update over ``accumulate`` micro-batches of ``batch_size``
    pairs (per device and worker). The learning rate warms up over
    ``warmup_ratio * total_steps`` steps, then decays linearly to 0 at ``total_steps``.
    Every ``checkpoint_every`` steps (and at the end) the full training state goes to
    ``output_dir/checkpoint``; ``resume=True`` continues from it. ``eval_every`` steps (and at
    the end) ``eval_arrays`` are evaluated. ``max_seconds`` stops early (with a checkpoint)
    once that much wall time has passed, and the learning rate then follows whichever of
    steps or time is further along (a time budget is not bit-reproducible); ``stop_after``
    stops after that step number as if interrupted (tests use it). Metrics go to
    ``output_dir/metrics.jsonl``; with a ``tokenizer`` the final model is also written by
    ``save_pretrained`` to ``output_dir/final``.

    ``kvstore``: ``"device"`` for one machine (all contexts in ``ctx``), ``"dist_sync"`` for
    several (start the processes as in ``docs/pretraining.md``; each worker reads its own
    slice of the data and writes to ``output_dir/worker-<rank>``).
    ``bf16``: the encoder's dense layers in bfloat16 on CPU (:func:`training.enable_bf16`).
    ``ema_decay`` (e.g. 0.999): evaluations and the final model use an exponential moving
    average of the weights (:class:`training.WeightAverage`), kept in the checkpoint.
    Returns a summary: steps, tokens/s, last training and evaluation metrics.
    """
    ctxs = _ctx_list(ctx)
    if bf16:
        if fp16:
            raise ValueError("choose one of fp16 (GPU) and bf16 (CPU)")
        training.enable_bf16(model, ctxs[0])
    distributed = isinstance(kvstore, str) and kvstore.startswith("dist")
    kv = mx.kv.create(kvstore) if distributed else kvstore
    rank, num_workers = (kv.rank, kv.num_workers) if not isinstance(kv, str) else (0, 1)
    if num_workers > 1:
        output_dir = os.path.join(output_dir, f"worker-{rank}")
        if max_seconds is not None:
            raise ValueError("max_seconds would stop distributed workers at different steps; "
                             "give total_steps instead")
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoint")
    log = JsonlLogger(os.path.join(output_dir, "metrics.jsonl"))

    if fp16:
        # AMP must patch MXNet before the model's graph is built; the caller builds the model,
        # so here we only attach the loss scaler (see training.enable_amp). GPU only.
        if not training._AMP["on"]:
            raise ValueError("fp16=True needs bert_gluon.training.enable_amp(ctx) called before "
                             "the model is built (and a GPU)")
    trainer = training.create_trainer(model, optimizer, learning_rate, weight_decay, kvstore=kv)
    if fp16:
        training.amp_init_trainer(trainer)
    training.set_grad_accumulation(model, accumulate)
    schedule = training.WarmupLinearSchedule.from_ratio(learning_rate, total_steps, warmup_ratio)
    loss_fn = PretrainingLoss()
    model.hybridize(static_alloc=True)
    loss_fn.hybridize(static_alloc=True)
    # gradients of the per-device mean loss are summed over devices and workers: average them
    loss_scale = 1.0 / (len(ctxs) * num_workers)
    ema = None if ema_decay is None else training.WeightAverage(model, ema_decay, ctxs[0])
    ema_path = os.path.join(ckpt_dir, "weight_average.params")

    step, epoch, next_batch, tokens_seen, train_seconds = 0, 0, 0, 0, 0.0
    if resume:
        state = training.load_training_state(ckpt_dir, trainer, model, ctx=ctxs)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        step, epoch, next_batch = state["step"], state["epoch"], state["next_batch"]
        tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]
        if ema is not None:
            if state.get("ema_updates") is None:
                raise ValueError(f"--resume with a weight average: {ckpt_dir} was written "
                                 f"without one")
            ema.load(ema_path, state["ema_updates"])
        log.log(event="resume", step=step, epoch=epoch, next_batch=next_batch)
    else:
        training.seed_everything(seed)
    if num_workers > 1:
        _sync_parameters(trainer, kv)

    global_bs = batch_size * len(ctxs)
    per_epoch = num_batches(train_data.arrays, global_bs, num_workers)
    if per_epoch < accumulate:
        raise ValueError(f"training data has {len(train_data)} pairs: fewer than one step of "
                         f"{accumulate} x {global_bs} per worker")
    log.log(event="start", rank=rank, num_workers=num_workers, devices=[str(c) for c in ctxs],
            pairs_total=len(train_data), pairs_per_worker_epoch=per_epoch * global_bs,
            step=step, total_steps=total_steps, batch_size=batch_size, accumulate=accumulate)

    def save(reason: str) -> None:
        if ema is not None:   # before save_training_state, whose state.json comes last
            ema.save(ema_path)
        training.save_training_state(ckpt_dir, trainer, model, step=step, epoch=epoch,
                                     next_batch=next_batch, tokens_seen=tokens_seen,
                                     train_seconds=train_seconds, seed=seed,
                                     total_steps=total_steps, reason=reason,
                                     ema_updates=None if ema is None else ema.updates)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step")
    metrics = PretrainingMetrics()
    summary: Dict[str, Any] = {"eval": None}
    t_start = time.time() - train_seconds
    t_window, tokens_window = time.time(), 0
    micro = 0
    stopped = None
    while step < total_steps and stopped is None:
        arrays = train_data.epoch_arrays(epoch)
        batches = iterate_batches(arrays, global_bs, seed=seed, epoch=epoch,
                                  start_batch=next_batch, part_index=rank, num_parts=num_workers)
        for b, batch in batches:
            # dropout is a function of (seed, micro-batch number): exact after --resume
            mx.random.seed(_rng_seed(seed, step * accumulate + micro))
            shards = [_to_nd({k: v[i::len(ctxs)] for k, v in batch.items()}, c)
                      for i, c in enumerate(ctxs)]
            with mx.autograd.record():
                outs = [_forward(model, loss_fn, nd) for nd in shards]
                losses = [o[0] * loss_scale for o in outs]
            for loss in losses:
                training.backward(loss, trainer)
            for nd, (_, mlm, nsp, mlm_scores, nsp_scores) in zip(shards, outs):
                metrics.update(mlm_scores, nsp_scores, nd, mlm, nsp)
            tokens = int(batch["valid_length"].sum()) * num_workers
            tokens_seen += tokens
            tokens_window += tokens
            micro += 1
            next_batch = b + 1
            if micro < accumulate:
                continue
            micro = 0
            step += 1
            trainer.set_learning_rate(schedule(_schedule_step(step, total_steps, t_start,
                                                              max_seconds)))
            grad_norm = training.optimizer_step(trainer, max_grad_norm, accumulate)
            if ema is not None:
                ema.update()
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == total_steps:
                res = metrics.result()
                now = time.time()
                res.update(step=step, epoch=epoch, lr=trainer.learning_rate,
                           tokens_per_s=tokens_window / max(now - t_window, 1e-9),
                           grad_norm=float(grad_norm.asscalar()) if grad_norm is not None else None,
                           elapsed_s=now - t_start)
                log.log(event="train", **res)
                summary["train"] = res
                if bar is not None:
                    bar.set_postfix(mlm=f"{res['mlm_acc']:.3f}", nsp=f"{res['nsp_acc']:.3f}",
                                    loss=f"{res['mlm_loss'] + res['nsp_loss']:.2f}")
                metrics.reset()
                t_window, tokens_window = now, 0
            if eval_arrays is not None and eval_every and step % eval_every == 0:
                summary["eval"] = _log_eval(model, eval_arrays, ctxs[0], log, step, ema)
            train_seconds = time.time() - t_start
            if stop_after is not None and step >= stop_after:
                stopped = "stop_after"
            elif max_seconds is not None and train_seconds >= max_seconds:
                stopped = "time limit"
            if step % checkpoint_every == 0 or stopped or step == total_steps:
                save(stopped or "periodic")
            if stopped or step >= total_steps:
                break
        else:   # the epoch ran out (no break): the next one is shuffled and masked afresh
            epoch, next_batch = epoch + 1, 0
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t_start
    if ema is not None and stopped != "stop_after":   # done: the model is its average now
        ema.copy_to_model()
    if eval_arrays is not None and stopped != "stop_after":
        summary["eval"] = _log_eval(model, eval_arrays, ctxs[0], log, step)
    if tokenizer is not None and rank == 0 and stopped != "stop_after":
        from .checkpoints import save_pretrained

        save_pretrained(model, tokenizer, os.path.join(output_dir, "final"),
                        pretraining_steps=step)
    summary.update(steps=step, epochs=epoch, stopped=stopped, tokens_seen=tokens_seen,
                   train_seconds=train_seconds,
                   tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
                   rank=rank, num_workers=num_workers)
    write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def _log_eval(model, arrays, ctx, log: JsonlLogger, step: int,
              ema: Optional[training.WeightAverage] = None) -> Dict[str, float]:
    if ema is None:
        res = evaluate(model, arrays, ctx=ctx)
    else:
        with ema.applied():
            res = evaluate(model, arrays, ctx=ctx)
    log.log(event="eval", step=step, **res)
    return res


def run_pretraining(data: str, output_dir: str, *, eval_data: Optional[str] = None,
                    vocab: Optional[str] = None, preset: str = "small",
                    config_path: Optional[str] = None, init_from: Optional[str] = None,
                    dynamic_masking: bool = False, max_eval_pairs: int = 2048,
                    gpus: Optional[Sequence[int]] = None, fp16: bool = False,
                    bf16: bool = False, seed: int = 0, **train_kwargs: Any) -> Dict[str, Any]:
    """Everything ``bert-gluon pretrain`` does: load the tokenizer and the static data folder
    (``create-pretraining-data``), build the model (``preset``/``config_path`` from scratch,
    or ``init_from`` a pretrained checkpoint), then :func:`pretrain` (``train_kwargs``)."""
    from .config import BERTConfig
    from .pretraining_data import load_shards
    from .tokenization import Tokenizer

    ctxs = [mx.gpu(i) for i in gpus] if gpus else [mx.cpu()]
    for c in ctxs:
        check_gpu(c)
    if fp16 and not training.enable_amp(ctxs[0]):
        raise ValueError("--fp16 needs a GPU (--gpus)")
    if init_from:
        model, tokenizer = build_pretraining_model(init_from=init_from, ctx=ctxs, seed=seed)
    else:
        vocab = vocab or default_vocab()
        tokenizer = Tokenizer.from_file(vocab)
        config = (BERTConfig.from_json(config_path) if config_path
                  else BERTConfig.preset(preset, vocab_size=len(tokenizer)))
        if config.vocab_size != len(tokenizer):
            raise ValueError(f"{config_path}: vocab_size {config.vocab_size} but {vocab} has "
                             f"{len(tokenizer)} tokens")
        model, _ = build_pretraining_model(config, ctx=ctxs, seed=seed)
    train = PretrainingData.from_shards(data, tokenizer, dynamic=dynamic_masking, seed=seed)
    _check_data_fits(model, train.meta, data)
    eval_arrays = None
    if eval_data:
        eval_all, _ = load_shards(eval_data)
        eval_arrays = {k: v[:max_eval_pairs] for k, v in eval_all.items()}
    return pretrain(model, train, output_dir, eval_arrays=eval_arrays, tokenizer=tokenizer,
                    seed=seed, ctx=ctxs, fp16=fp16, bf16=bf16, **train_kwargs)


def default_vocab() -> str:
    """``$BERT_VOCAB`` or ``../shared/data/vocab/bert-base-uncased-vocab.txt`` (repo-relative)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("BERT_VOCAB") or os.path.join(
        root, "..", "shared", "data", "vocab", "bert-base-uncased-vocab.txt")

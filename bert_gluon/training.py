"""Training utilities shared by fine-tuning and pre-training.

Everything here takes a Gluon model or ``Trainer`` and knows nothing about the task::

    trainer = create_trainer(model, "bertadam", learning_rate=5e-5, weight_decay=0.01)
    schedule = WarmupLinearSchedule(5e-5, total_steps=1000, warmup_steps=100)
    set_grad_accumulation(model, accumulate=2)
    for step, batch in enumerate(batches, start=1):
        with mx.autograd.record():
            loss = loss_fn(model(*inputs), labels).mean()
        backward(loss, trainer)                       # AMP loss scaling on GPU when enabled
        if step % accumulate == 0:
            trainer.set_learning_rate(schedule(update_step))
            optimizer_step(trainer, max_grad_norm=1.0, accumulate=accumulate)

Nothing in here calls ``.asscalar()`` / ``.asnumpy()``: the host stays out of the way of
MXNet's asynchronous engine until the caller decides to log.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional

import gluonnlp  # noqa: F401  (registers the 'bertadam' optimizer)
import mxnet as mx
import numpy as np
from mxnet import gluon

from .fileio import atomic_path, write_json
from .runtime import seed_everything

__all__ = ["OPTIMIZERS", "no_weight_decay", "create_trainer", "WarmupLinearSchedule",
           "trainable_params", "set_grad_accumulation", "zero_grad", "clip_gradients",
           "optimizer_step", "backward", "enable_amp", "amp_init_trainer", "enable_bf16",
           "seed_everything",
           "get_rng_state", "set_rng_state", "save_training_state", "load_training_state"]


@mx.optimizer.Optimizer.register
class BiasCorrectedAdamW(gluonnlp.optimizer.BERTAdam):
    """AdamW *with* bias correction (Loshchilov & Hutter; ``torch.optim.AdamW``).

    BERTAdam's fused kernel does ``w -= lr * (m / (sqrt(v) + eps) + wd * w)`` with raw moments.
    Scaling ``lr`` by ``c_t = sqrt(1 - beta2^t) / (1 - beta1^t)`` (and ``wd`` by ``1 / c_t``, so
    the decay term is unchanged) gives ``lr * m_hat / (sqrt(v_hat) + eps / sqrt(1 - beta2^t))``,
    the bias-corrected update, in the same single kernel call.
    """

    def _correction(self, index) -> float:
        t = self._index_update_count[index]
        return math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)

    def _get_lrs(self, indices):
        return [lr * self._correction(i) for lr, i in zip(super()._get_lrs(indices), indices)]

    def _get_wds(self, indices):
        return [wd / self._correction(i) for wd, i in zip(super()._get_wds(indices), indices)]


# optimizer names accepted by ``create_trainer`` -> MXNet registry names.
# "bertadam": Adam with *decoupled* weight decay and no bias correction (GluonNLP's BERTAdam,
# like BERT's own optimizer); "adamw": the same with bias correction (torch's AdamW);
# "lamb": layer-wise adaptive moments (You et al. 2019) for large batches;
# "adam": plain Adam (weight decay as L2 in the gradient).
OPTIMIZERS = {"bertadam": "bertadam", "adamw": "biascorrectedadamw", "lamb": "lamb",
              "adam": "adam"}


def no_weight_decay(name: str) -> bool:
    """True for parameters that get no weight decay: biases and LayerNorm ``gamma``/``beta``.

    (Gluon names them ``..._bias``, ``..._gamma``, ``..._beta``.)
    """
    return name.endswith(("_bias", "_gamma", "_beta", ".bias", ".gamma", ".beta"))


def trainable_params(model: gluon.Block) -> List[gluon.Parameter]:
    """The parameters of ``model`` that receive gradients (``grad_req != 'null'``)."""
    return [p for p in model.collect_params().values() if p.grad_req != "null"]


def create_trainer(model: gluon.Block, optimizer: str = "bertadam", learning_rate: float = 5e-5,
                   weight_decay: float = 0.01, epsilon: float = 1e-6, kvstore: Any = "device",
                   **optimizer_params: Any) -> gluon.Trainer:
    """A ``gluon.Trainer`` over ``model``'s parameters, BERT style.

    Weight decay ``weight_decay`` applies to weight matrices and embeddings only; biases and
    LayerNorm ``gamma``/``beta`` get ``wd_mult = 0``. ``optimizer`` is one of ``OPTIMIZERS``.
    The trainer uses ``update_on_kvstore=False`` so gradients can be clipped between
    ``allreduce_grads()`` and ``update()`` (see :func:`optimizer_step`). ``kvstore`` is
    passed to the ``Trainer``: ``"device"`` (several GPUs) or a ``mx.kv.create("dist_sync")``
    store for several machines (gradients are then *summed* over workers).
    """
    key = optimizer.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    params = model.collect_params()
    for name, p in params.items():
        if no_weight_decay(name):
            p.wd_mult = 0.0
    opt_params = {"learning_rate": learning_rate, "wd": weight_decay, "epsilon": epsilon}
    opt_params.update(optimizer_params)
    trainable = {n: p for n, p in params.items() if p.grad_req != "null"}
    return gluon.Trainer(trainable, OPTIMIZERS[key], opt_params, kvstore=kvstore,
                         update_on_kvstore=False)


class WarmupLinearSchedule:
    """Learning rate that rises linearly for ``warmup_steps`` updates, then falls linearly to 0.

    ``schedule(step)`` for ``step = 1, 2, ..., total_steps`` (1-based, the update about to be
    made): ``base_lr * step / warmup_steps`` during warm-up, then
    ``base_lr * (total_steps - step) / (total_steps - warmup_steps)``.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                             f"got {warmup_steps}")
        self.base_lr, self.total_steps, self.warmup_steps = base_lr, total_steps, warmup_steps

    @classmethod
    def from_ratio(cls, base_lr: float, total_steps: int, warmup_ratio: float
                   ) -> "WarmupLinearSchedule":
        """``warmup_steps = int(total_steps * warmup_ratio)`` (BERT's ``warmup_proportion``)."""
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return cls(base_lr, total_steps, int(total_steps * warmup_ratio))

    def __call__(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.base_lr * step / max(1, self.warmup_steps)
        decay = self.total_steps - self.warmup_steps
        return self.base_lr * max(0.0, (self.total_steps - step) / max(1, decay))


def set_grad_accumulation(model: gluon.Block, accumulate: int) -> None:
    """Make gradients add up over ``accumulate`` backward passes (``grad_req='add'``).

    With ``accumulate > 1`` the caller must zero the gradients after each update;
    :func:`optimizer_step` does that.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    for p in trainable_params(model):
        p.grad_req = "add" if accumulate > 1 else "write"


def zero_grad(params: Iterable[gluon.Parameter]) -> None:
    """Set every gradient to 0 (needed between updates with ``grad_req='add'``)."""
    for p in params:
        if p.grad_req != "null":
            p.zero_grad()


def clip_gradients(params: Iterable[gluon.Parameter], max_norm: float) -> mx.nd.NDArray:
    """Rescale gradients so that their global 2-norm is at most ``max_norm``.

    Returns the norm *before* clipping as an NDArray (no host sync; read it at log time).
    """
    from gluonnlp.utils import clip_grad_global_norm

    params = [p for p in params if p.grad_req != "null"]
    return clip_grad_global_norm(params, max_norm, check_isfinite=False)


def optimizer_step(trainer: gluon.Trainer, max_grad_norm: Optional[float] = 1.0,
                   accumulate: int = 1) -> Optional[mx.nd.NDArray]:
    """One update: all-reduce, clip to ``max_grad_norm`` (``None``: no clipping), update.

    Gradients are assumed to be of a *mean* loss per backward pass; with ``accumulate``
    passes they are averaged. Zeroes gradients afterwards when they accumulate
    (``grad_req='add'``). Returns the pre-clip gradient norm (NDArray) or ``None``.
    """
    params = [p for p in trainer._params if p.grad_req != "null"]
    trainer.allreduce_grads()
    norm = None
    if max_grad_norm is not None:
        if _AMP["on"]:   # clip the true gradient, not the loss-scaled one (AMP, GPU only)
            from mxnet.contrib import amp

            amp.unscale(trainer)
        # clip the *averaged* gradient: scale first so max_norm means the same for any accumulate
        if accumulate > 1:
            for p in params:
                for g in p.list_grad():
                    g /= accumulate
        norm = clip_gradients(params, max_grad_norm)
        trainer.update(1)
    else:
        trainer.update(accumulate)
    if any(p.grad_req == "add" for p in params):
        zero_grad(params)
    return norm


# --- mixed precision: fp16 AMP on GPU, bfloat16 dense layers on CPU -----------------------
_AMP = {"on": False}


def enable_amp(ctx: mx.Context) -> bool:
    """Turn on MXNet AMP (fp16 compute, fp32 master weights) when ``ctx`` is a GPU.

    Must be called *before* the model is built; then pass the trainer to
    :func:`amp_init_trainer`. Returns whether AMP is on.
    Untested here: the development machine has no GPU.
    """
    if ctx.device_type != "gpu":
        return False
    from mxnet.contrib import amp

    amp.init()
    _AMP["on"] = True
    return True


def enable_bf16(model: gluon.HybridBlock, ctx: mx.Context) -> None:
    """Mixed precision on CPU: ``model``'s encoder dense layers compute in bfloat16, its
    parameters, gradients and optimizer stay float32 (:func:`bert_gluon.layers.set_dense_dtype`).
    bfloat16 has float32's exponent range, so no loss scaling. Pays where the CPU has AVX-512
    BF16 (warns otherwise); a ``RuntimeError`` where oneDNN cannot run bfloat16 at all."""
    from .layers import set_dense_dtype
    from .runtime import require_bf16

    if ctx.device_type != "cpu":
        raise ValueError(f"bf16 is the CPU's mixed precision; on {ctx} use fp16 AMP")
    require_bf16()
    set_dense_dtype(model, "bfloat16")


def amp_init_trainer(trainer: gluon.Trainer) -> None:
    """Attach AMP's dynamic loss scaler to ``trainer`` (no-op when AMP is off)."""
    if _AMP["on"]:
        from mxnet.contrib import amp

        amp.init_trainer(trainer)


def backward(loss: mx.nd.NDArray, trainer: Optional[gluon.Trainer] = None) -> None:
    """``loss.backward()``, with AMP's loss scaling when AMP is on."""
    if _AMP["on"] and trainer is not None:
        from mxnet.contrib import amp

        with amp.scale_loss(loss, trainer) as scaled:
            mx.autograd.backward(scaled)
    else:
        loss.backward()


# --- weight averaging -------------------------------------------------------------------
class WeightAverage:
    """Exponential moving average of a model's trainable parameters (Polyak averaging),
    the weights that evaluation and the final checkpoint use when it is on.

    After each optimizer update, ``avg = d * avg + (1 - d) * w`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (the ramp of TensorFlow's
    ``ExponentialMovingAverage``, so the random initialisation fades quickly). The averages
    live on ``ctx`` (the first device) in float32.
    """

    def __init__(self, model: gluon.Block, decay: float, ctx: mx.Context):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), got {decay}")
        self.decay, self.ctx, self.updates = decay, ctx, 0
        # structural names ("encoder.word_embed.weight"), as save_parameters writes them:
        # the same in every instance of the model, so a saved average loads into a new one
        self.params = {name: p for name, p in model._collect_params_with_prefix().items()
                       if p.grad_req != "null"}
        self.avg = {name: p.data(ctx).copy() for name, p in self.params.items()}

    def update(self) -> None:
        """Fold the current weights in (call after each optimizer update)."""
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for name, p in self.params.items():
            avg = self.avg[name]
            avg *= d
            avg += (1.0 - d) * p.data(self.ctx)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own weights after."""
        saved = {name: p.data(self.ctx).copy() for name, p in self.params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.set_data(saved[name])

    def copy_to_model(self) -> None:
        """Replace the model's weights by the averages (all devices)."""
        for name, p in self.params.items():
            p.set_data(self.avg[name])

    def save(self, path: str) -> None:
        """The averages (atomically) to ``path``; :attr:`updates` goes with the caller's state."""
        with atomic_path(path) as tmp:
            mx.nd.save(tmp, self.avg)

    def load(self, path: str, updates: int) -> None:
        loaded = mx.nd.load(path)
        if set(loaded) != set(self.avg):
            raise ValueError(f"{path}: weight averages of other parameters than this model's")
        self.avg = {name: loaded[name].as_in_context(self.ctx) for name in self.avg}
        self.updates = int(updates)


# --- reproducibility and resuming -------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    """Python and NumPy RNG states (MXNet's cannot be read back; reseed it per epoch)."""
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_training_state(directory: str, trainer: gluon.Trainer, model: gluon.Block,
                        **meta: Any) -> None:
    """Everything needed to resume, written atomically into ``directory``:
    ``model.params``, ``trainer.states`` (optimizer moments), ``rng.pkl`` and
    ``state.json`` (``meta``: epoch, step, best metric ...). ``state.json`` is written last,
    so a crash mid-save leaves the previous consistent state in place.
    """
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "model.params")) as tmp:
        model.save_parameters(tmp)
    with atomic_path(os.path.join(directory, "trainer.states")) as tmp:
        trainer.save_states(tmp)
    with atomic_path(os.path.join(directory, "rng.pkl")) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(get_rng_state(), f)
    write_json(os.path.join(directory, "state.json"), meta)


def load_training_state(directory: str, trainer: gluon.Trainer, model: gluon.Block,
                        ctx: Optional[mx.Context] = None) -> Optional[Dict[str, Any]]:
    """Restore what :func:`save_training_state` wrote; returns its ``meta`` or ``None`` when
    ``directory`` holds no saved state."""
    state_path = os.path.join(directory, "state.json")
    if not os.path.exists(state_path):
        return None
    with open(state_path, encoding="utf-8") as f:
        meta = json.load(f)
    model.load_parameters(os.path.join(directory, "model.params"), ctx=ctx)
    trainer.load_states(os.path.join(directory, "trainer.states"))
    with open(os.path.join(directory, "rng.pkl"), "rb") as f:
        set_rng_state(pickle.load(f))
    return meta

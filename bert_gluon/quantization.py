"""INT8 inference of a fine-tuned :class:`~bert_gluon.model.BERTClassifier` on CPU.

MXNet's oneDNN backend runs the dense layers and the fused self-attention GEMMs with 8-bit
integers. Post-training quantization needs only a few hundred *calibration* examples: they
run through the fp32 model once, the range of every quantized layer's output is recorded,
and those ranges become the fixed INT8 scales (``calib_mode="naive"``: min/max)::

    loader = make_dataloader(train_samples[:320], 32, tokenizer.pad_id, shuffle=False)
    qnet = quantize_classifier(model, loader)                # a hybridized SymbolBlock
    logits = qnet(words, segments, valid_length)             # same call as the fp32 model

This follows GluonNLP 0.10's ``scripts/bert`` recipe: ``quantize_net_v2`` with the
``MKLDNN_QUANTIZE`` backend and min/max calibration where GELU output ranges are clipped
(at 10) so a rare outlier does not waste the 8-bit range. What stays fp32: the attention core
(scores, softmax, weighted values: bert_gluon's compiled ``bg_self_attention`` on CPU, see
:mod:`bert_gluon.ops`), LayerNorm with the residual additions, the pooler's tanh and, by
default, the final classifier. The speed-up over fp32 depends on the CPU's 8-bit
instructions (AVX-512 VNNI): see benchmarks/README.md for the measured figures.
"""
from __future__ import annotations

import ctypes
import logging
import random
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import NDArrayHandle, py_str

__all__ = ["quantize_classifier", "quantize_checkpoint_model", "CalibrationCollector"]


class CalibrationCollector:
    """Min/max of each quantized layer's output over the calibration batches, with
    optional clipping of GELU outputs (``clip_gelu``) as GluonNLP's ``BertLayerCollector``.

    MXNet calls :meth:`collect` for every node output while calibrating; only node outputs
    are recorded, and MXNet uses those of the quantized layers.
    """

    def __init__(self, clip_gelu: Optional[float] = 10.0, logger=None):
        self.clip_gelu = clip_gelu
        self.min_max_dict = {}
        self.logger = logger

    @staticmethod
    def include(name: str) -> bool:
        return name.endswith("_output")         # MXNet names node outputs "<node>_output"

    def collect(self, name, arr) -> None:
        name = py_str(name)
        if not self.include(name):
            return
        arr = mx.nd.NDArray(ctypes.cast(arr, NDArrayHandle), writable=False)
        lo, hi = float(mx.nd.min(arr).asscalar()), float(mx.nd.max(arr).asscalar())
        # GELU is fused into its dense layer ("..._fully_connected_eltwise_N") by oneDNN
        if self.clip_gelu is not None and ("gelu" in name.lower() or "eltwise" in name):
            hi = min(hi, self.clip_gelu)
        if name in self.min_max_dict:
            old_lo, old_hi = self.min_max_dict[name]
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        self.min_max_dict[name] = (lo, hi)


def _as_batches(calib_data: Iterable, batch_size: Optional[int],
                num_examples: Optional[int]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Re-batch ``(words, valid_length, segments, ...)`` batches into equal-shaped ones.

    MXNet calibrates a graph bound to one input shape, so every batch is padded to the
    longest sequence seen and cut to ``batch_size`` rows (the last partial batch is dropped
    unless it is the only one).
    """
    words, segments, valid = [], [], []
    for i, batch in enumerate(calib_data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            raise ValueError(f"calib_data batch {i}: expected (words, valid_length, segments, "
                             f"...), got {type(batch).__name__}")
        w, v, s = (b.asnumpy() if isinstance(b, mx.nd.NDArray) else np.asarray(b)
                   for b in batch[:3])
        if w.ndim != 2 or s.shape != w.shape or v.shape != (w.shape[0],):
            raise ValueError(f"calib_data batch {i}: words {w.shape}, segments {s.shape}, "
                             f"valid_length {v.shape} do not fit (batch, seq_len)/(batch,)")
        words += list(w)
        segments += list(s)
        valid += list(v)
        if num_examples is not None and len(words) >= num_examples:
            break
    if not words:
        raise ValueError("calib_data is empty: quantization needs calibration examples")
    n = len(words) if num_examples is None else min(num_examples, len(words))
    T = max(len(w) for w in words[:n])
    W = np.zeros((n, T), dtype=np.float32)
    S = np.zeros((n, T), dtype=np.float32)
    for j in range(n):
        W[j, :len(words[j])] = words[j]
        S[j, :len(segments[j])] = segments[j]
    V = np.asarray(valid[:n], dtype=np.float32)
    bs = min(batch_size or n, n)
    return [(W[i:i + bs], S[i:i + bs], V[i:i + bs]) for i in range(0, n - bs + 1, bs)]


def quantize_classifier(model: mx.gluon.HybridBlock, calib_data: Iterable,
                        num_calib_examples: Optional[int] = 320, batch_size: Optional[int] = 32,
                        calib_mode: str = "naive", clip_gelu: Optional[float] = 10.0,
                        exclude_layers_match: Sequence[str] = ("_plus",),
                        exclude_operators: Sequence[str] = ("_sg_mkldnn_selfatt_valatt",),
                        quantize_output: bool = False, quantized_dtype: str = "int8",
                        granularity: str = "tensor-wise", ctx: mx.Context = mx.cpu(),
                        logger: Optional[logging.Logger] = None) -> mx.gluon.SymbolBlock:
    """Post-training INT8 quantization of a classifier called as ``model(words, segments,
    valid_length)`` (e.g. :class:`~bert_gluon.model.BERTClassifier`).

    Args:
        model: the fp32 model, initialized (it gets hybridized and exported on the way).
        calib_data: iterable of batches ``(words, valid_length, segments, ...)`` (NDArray or
            NumPy; extra fields such as labels are ignored): the layout of
            :func:`bert_gluon.data.make_dataloader`, e.g. a loader over training samples.
        num_calib_examples: how many examples to calibrate on (a few hundred is plenty).
        batch_size: rows per calibration batch.
        calib_mode: ``"naive"`` (min/max of each layer output, with GELU clipping) or
            ``"entropy"`` (KL-divergence thresholds; slower, sometimes more accurate).
        clip_gelu: upper bound for GELU output ranges (``None``: no clipping); naive mode only.
        exclude_layers_match: substrings of node names kept in fp32. The default keeps the
            residual and embedding additions (``_plus``) in fp32: quantizing them flipped 76 %
            of the MRPC dev predictions of a fine-tuned MiniLM (95 % agree without them).
            ``()`` quantizes everything the backend supports.
        exclude_operators: operator types kept in fp32.
        quantize_output: also quantize the final classification layer (default: keep fp32).
        quantized_dtype: ``"int8"`` (signed activations everywhere). ``"auto"`` (uint8 after
            non-negative outputs) fails on this graph in MXNet 1.9.1 (type mismatch).
        granularity: weight scales ``"tensor-wise"`` (one per layer, fastest) or
            ``"channel-wise"`` (one per output unit: closer to fp32, slower in MXNet 1.9.1).
            Measured on a fine-tuned MiniLM (MRPC dev, 79.2 % in fp32): tensor-wise 76.7 % at
            1.5x fp32 speed, channel-wise 77.9 % at 1.1x (benchmarks/README.md).
        ctx: only CPU is supported (oneDNN).

    Returns:
        A hybridized ``SymbolBlock`` taking ``(words, segments, valid_length)`` like ``model``
        and returning the same ``(batch, num_classes)`` scores.
    """
    from mxnet.contrib.quantization import quantize_net_v2

    if ctx.device_type != "cpu":
        raise ValueError(f"INT8 quantization runs on CPU (oneDNN) only, got ctx={ctx}")
    if calib_mode not in ("naive", "entropy"):
        raise ValueError(f"calib_mode must be 'naive' or 'entropy', got {calib_mode!r}")
    if granularity not in ("tensor-wise", "channel-wise"):
        raise ValueError(f"granularity must be 'tensor-wise' or 'channel-wise', "
                         f"got {granularity!r}")
    batches = _as_batches(calib_data, batch_size, num_calib_examples)
    loader = [tuple(mx.nd.array(x, ctx=ctx) for x in b) for b in batches]
    exclude = list(exclude_layers_match)
    if not quantize_output:
        output = getattr(model, "output", None)
        if output is not None:
            exclude.append(output.name)          # e.g. "bertclassifier0_dense1"
    collector = None
    mode = calib_mode
    if calib_mode == "naive":
        collector = CalibrationCollector(clip_gelu, logger)
        mode = "customize"
    flags = dict(getattr(model, "_flags", []))      # export re-hybridizes with defaults
    # bert_gluon's compiled attention and AddNorm stay in the graph as fp32 nodes (MXNet's
    # own softmax-with-length alone cost more than all INT8 dense layers together)
    qnet = quantize_net_v2(model, quantized_dtype=quantized_dtype, quantize_mode="full",
                           quantize_granularity=granularity, exclude_layers_match=exclude,
                           exclude_operators=list(exclude_operators), calib_data=loader,
                           calib_mode=mode, num_calib_examples=sum(len(b[0]) for b in batches),
                           ctx=ctx, LayerOutputCollector=collector, logger=logger)
    model.hybridize(True, **flags)
    qnet.hybridize(static_alloc=True, static_shape=True)
    return qnet



def quantize_checkpoint_model(model: mx.gluon.HybridBlock, tokenizer, meta: Dict[str, Any],
                              train_file: Optional[str] = None, data_dir: Optional[str] = None,
                              num_examples: int = 320, batch_size: int = 32, seed: int = 0,
                              **kwargs) -> mx.gluon.SymbolBlock:
    """INT8 version of a fine-tuned checkpoint, calibrated on ``num_examples`` random pairs
    of the training data it was fine-tuned on (what ``evaluate/predict --int8`` call).

    ``meta`` is the checkpoint's ``config.json`` (``model.meta``): its ``task`` (or
    ``train_file``), ``text_columns``, ``label_column``, ``class_labels``, ``max_len`` and
    ``pair`` choose and transform the calibration examples exactly as fine-tuning did.
    Other keyword arguments go to :func:`quantize_classifier`.
    """
    from .data import (BERTDatasetTransform, load_task, make_dataloader, read_examples,
                       transform_examples)

    labels = meta.get("class_labels")
    if train_file is None and not meta.get("task"):
        raise ValueError("INT8 calibration needs training examples: the checkpoint names no "
                         "task, so pass train_file (a TSV/CSV like the one it was trained on)")
    if train_file is not None:
        examples = read_examples(train_file, meta["text_columns"], meta.get("label_column"),
                                 labels)
    else:
        examples = load_task(meta["task"], "train", data_dir)
    chosen = random.Random(seed).sample(examples, min(num_examples, len(examples)))
    transform = BERTDatasetTransform(tokenizer, int(meta.get("max_len", 128)), labels,
                                     pad=False, pair=bool(meta.get("pair", True)))
    samples = transform_examples(chosen, transform, desc="calibration")
    loader = make_dataloader(samples, batch_size, tokenizer.pad_id, shuffle=False,
                             regression=labels is None)
    return quantize_classifier(model, loader, num_calib_examples=len(samples),
                               batch_size=batch_size, **kwargs)

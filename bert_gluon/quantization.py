"""INT8 (and bfloat16) inference of a fine-tuned :class:`~bert_gluon.model.BERTClassifier` on CPU.

Two backends compute the encoder's dense layers (the fused Q/K/V projection, the attention
output and both feed-forward layers of every layer: ~90 % of an fp32 pass) with 8-bit
integers; everything else (embeddings, attention core, LayerNorm, pooler, classifier) stays
float32. ``quantize_classifier(model, backend="auto")`` picks the first that runs fast here:

- ``"bert_gluon"`` (:func:`quantize_dense_layers`): bert_gluon's compiled ``bg_int8_dense``
  (``csrc/int8_dense.cc``) on the CPU's AMX tiles (Intel Sapphire Rapids and later) or its
  AVX-512 VNNI instructions (Intel Cascade Lake and later, AMD Zen 4 and later). Weights
  get one int8 scale per output unit, activations one per token row, computed on the fly,
  so there is nothing to calibrate; the GELU after the first feed-forward layer is fused in::

      qnet = quantize_classifier(model, backend="bert_gluon")
      logits = qnet(words, segments, valid_length)          # same call as the fp32 model

- ``"onednn"``: MXNet's oneDNN quantization, GluonNLP 0.10's ``scripts/bert`` recipe
  (``quantize_net_v2``, ``MKLDNN_QUANTIZE`` backend). Post-training scales come from a few
  hundred *calibration* examples run once through the fp32 model (``calib_mode="naive"``:
  min/max, with GELU output ranges clipped at 10 so a rare outlier does not waste the 8-bit
  range). It uses AVX-512 VNNI where present and runs on any x86 CPU::

      loader = make_dataloader(train_samples[:320], 32, tokenizer.pad_id, shuffle=False)
      qnet = quantize_classifier(model, loader, backend="onednn")

A third option keeps 16 bits: ``bf16_dense_layers(model)`` runs the same dense layers as
MXNet's ``FullyConnected`` on bfloat16 casts of inputs and weights (oneDNN's AVX-512 BF16
kernels: AMD Zen 4, Intel Cooper Lake and later), with nothing to calibrate and float32's
range::

      bnet = bf16_dense_layers(model)
      logits = bnet(words, segments, valid_length)

The speed-up over fp32 and the accuracy of each, per CPU kind: benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import NDArrayHandle, py_str

from .runtime import require_bf16

__all__ = ["quantize_classifier", "quantize_checkpoint_model", "quantize_dense_layers",
           "bf16_dense_layers",
           "pack_int8_weight", "fast_int8_kernel", "int8_kernel", "resolve_backend",
           "CalibrationCollector"]

BACKENDS = ("auto", "bert_gluon", "onednn")


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


def pack_int8_weight(weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A dense layer's ``(N, K)`` float32 weight as ``bg_int8_dense`` reads it: int8 values
    with one scale per output unit (``weight[n] ~ q[n] * scale[n]``, ``|q| <= 127``), padded
    with zeros to ``N`` a multiple of 32 and ``K`` of 64, and packed into AMX B-tiles
    ``[N/16][K/64][16: k/4][16 units][4: k%4]`` (see ``csrc/int8_dense.cc``).

    Returns ``(packed (Np * Kp,) int8, scale (N,) float32)``."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a (num_hidden, in_units) weight, got shape {weight.shape}")
    N, K = weight.shape
    amax = np.abs(weight).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    Np, Kp = -(-N // 32) * 32, -(-K // 64) * 64
    full = np.zeros((Np, Kp), dtype=np.int8)
    full[:N, :K] = q
    packed = full.reshape(Np // 16, 16, Kp // 64, 16, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(packed).reshape(-1), scale


def resolve_backend(backend: str = "auto") -> str:
    """``"bert_gluon"`` or ``"onednn"`` for ``backend`` (``"auto"``: bert_gluon's operator
    where the CPU has AMX INT8 tiles or AVX-512 VNNI, else MXNet's oneDNN quantization)."""
    if backend not in BACKENDS:
        raise ValueError(f"INT8 backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "bert_gluon" if fast_int8_kernel() else "onednn"
    return backend


def int8_kernel() -> Optional[str]:
    """Which kernel ``bg_int8_dense`` runs here: ``"amx"`` (Intel AMX INT8 tiles),
    ``"vnni"`` (AVX-512 VNNI), ``"plain"`` (a portable loop: same numbers, slow), or None when
    bert_gluon's compiled operators do not load. ``BERT_GLUON_INT8_KERNEL=vnni`` or
    ``=plain`` asks for a slower one than the best (the value then says which runs)."""
    from . import ops

    if not ops.use_fast_ops():
        return None
    flags = ops._cpu_flags()
    order = ["plain", "vnni", "amx"]
    best = "amx" if b" amx_int8" in flags and b" amx_tile" in flags else (
        "vnni" if b" avx512_vnni" in flags else "plain")
    want = os.environ.get("BERT_GLUON_INT8_KERNEL", "")
    if want in order and order.index(want) < order.index(best):
        return want
    return best


def fast_int8_kernel() -> bool:
    """Whether :func:`quantize_dense_layers` runs here on AMX tiles or AVX-512 VNNI (the
    ``"auto"`` backend picks it then; its portable kernel is slower than fp32)."""
    return int8_kernel() in ("amx", "vnni")


def _constant(sym: mx.sym.Symbol, entry, nodes, params: Dict[str, mx.nd.NDArray]):
    """The value of a graph entry computed only from parameters (e.g. the attention's
    per-head interleaved Q/K/V weight), or None when it depends on an input."""
    node = nodes[entry[0]]
    if node["op"] == "null":
        return params.get(node["name"])
    out = sym.get_internals()[node["name"] + "_output"]
    args = out.list_arguments()
    if any(a not in params for a in args):
        return None
    return mx.nd.CachedOp(out)(*[params[a] for a in args])


def quantize_dense_layers(model: mx.gluon.HybridBlock, num_inputs: int = 3,
                          exclude_layers_match: Sequence[str] = ()) -> mx.gluon.SymbolBlock:
    """INT8 inference with bert_gluon's own operator: every position-wise dense layer of the
    model (``FullyConnected`` with ``flatten=False``: the fused Q/K/V projection, the
    attention output and both feed-forward layers of each encoder layer) becomes
    ``bg_int8_dense``, with int8 weights (one scale per output unit, :func:`pack_int8_weight`)
    and the GELU that follows fused into it. The activations are quantized on the fly, one
    scale per token row, so there is nothing to calibrate. Embeddings, attention core,
    LayerNorm, pooler and classifier stay float32.

    The sums run on AMX tiles or AVX-512 VNNI where the CPU has them (:func:`int8_kernel`); the
    returned block needs bert_gluon's compiled operators, like the fp32 model on CPU.

    Args:
        model: the fp32 model (e.g. a :class:`~bert_gluon.model.BERTClassifier`), called as
            ``model(data0, ..., data{num_inputs-1})``.
        exclude_layers_match: substrings of dense-layer names kept in float32.
    """
    from . import ops

    if not ops.use_fast_ops():
        raise RuntimeError("quantize_dense_layers needs bert_gluon's compiled CPU operators "
                           "(see bert_gluon.ops): " + str(ops._state.get("error")))
    import json

    inputs = [mx.sym.var(f"data{i}") for i in range(num_inputs)]
    out = model(*inputs)
    sym = mx.sym.Group(list(out)) if isinstance(out, (tuple, list)) else out
    params = {p.name: p.data(mx.cpu()) for p in model.collect_params().values()}
    graph = json.loads(sym.tojson())
    nodes = graph["nodes"]
    consumers: Dict[int, List[int]] = {}
    for i, node in enumerate(nodes):
        for e in node["inputs"]:
            consumers.setdefault(e[0], []).append(i)
    for h in graph["heads"]:
        consumers.setdefault(h[0], []).append(-1)

    new_nodes: List[Dict[str, Any]] = []
    remap: Dict[int, int] = {}
    new_params: Dict[str, mx.nd.NDArray] = {}
    fused: Dict[int, int] = {}          # GELU node -> its dense layer

    def ref(e):
        return [remap[e[0]], e[1], 0]

    def var(name: str, value: np.ndarray) -> List[int]:
        new_nodes.append({"op": "null", "name": name, "inputs": []})
        new_params[name] = mx.nd.array(value, dtype=value.dtype)
        return [len(new_nodes) - 1, 0, 0]

    for i, node in enumerate(nodes):
        if i in fused:
            remap[i] = remap[fused[i]]
            continue
        attrs = node.get("attrs", {})
        weight = bias = None
        if (node["op"] == "FullyConnected" and attrs.get("flatten") == "False"
                and not any(m in node["name"] for m in exclude_layers_match)):
            weight = _constant(sym, node["inputs"][1], nodes, params)
            if attrs.get("no_bias", "False") != "True":
                bias = _constant(sym, node["inputs"][2], nodes, params)
                if bias is None:
                    weight = None
        if weight is None:
            new_nodes.append(dict(node, inputs=[ref(e) for e in node["inputs"]]))
            remap[i] = len(new_nodes) - 1
            continue
        w = weight.asnumpy()
        packed, scale = pack_int8_weight(w)
        b = bias.asnumpy() if bias is not None else np.zeros(w.shape[0], np.float32)
        users = consumers.get(i, [])
        act = "none"
        if len(users) == 1 and users[0] >= 0:
            user = nodes[users[0]]
            if user["op"] == "LeakyReLU" and user.get("attrs", {}).get("act_type") == "gelu":
                act = "gelu"
                fused[users[0]] = i
        name = node["name"] + "_int8"
        entries = [ref(node["inputs"][0]), var(name + "_weight", packed),
                   var(name + "_weight_scale", scale), var(name + "_bias", b.astype(np.float32))]
        new_nodes.append({"op": "bg_int8_dense", "name": name, "inputs": entries,
                          "attrs": {"num_hidden": str(w.shape[0]), "in_units": str(w.shape[1]),
                                    "act": act}})
        remap[i] = len(new_nodes) - 1
    graph = {"nodes": new_nodes, "heads": [ref(h) for h in graph["heads"]],
             "arg_nodes": [j for j, n in enumerate(new_nodes) if n["op"] == "null"],
             "attrs": graph.get("attrs", {})}
    qsym = mx.sym.load_json(json.dumps(graph))
    with warnings.catch_warnings():        # "cannot decide type" of the inputs: float32
        warnings.simplefilter("ignore", UserWarning)
        net = mx.gluon.SymbolBlock(qsym, [mx.sym.var(f"data{i}") for i in range(num_inputs)])
    values = dict(params, **new_params)
    for p in net.collect_params().values():
        value = values[p.name]
        p.dtype = value.dtype
        p.grad_req = "null"                 # inference only: bg_int8_dense has no gradient
        p._load_init(value, mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def bf16_dense_layers(model: mx.gluon.HybridBlock, num_inputs: int = 3) -> mx.gluon.SymbolBlock:
    """bfloat16 inference: ``model`` traced with its encoder's dense layers in bfloat16
    (:func:`bert_gluon.layers.set_dense_dtype`: the fused Q/K/V projection, the attention output
    and both feed-forward layers run as ``FullyConnected`` on bfloat16 casts of their inputs and
    weights, oneDNN's AVX-512 BF16 kernels, their outputs cast back to float32), as a
    ``SymbolBlock`` sharing ``model``'s float32 parameters. Nothing to calibrate: bfloat16 keeps
    float32's exponent range. ``model`` itself keeps the precision it had.

    Worth it only where the CPU has AVX-512 BF16 (:func:`bert_gluon.runtime.fast_bf16`): on
    other AVX-512 CPUs oneDNN emulates it (2.5x slower than float32 on a 384 -> 1536 layer), and
    without AVX-512 it has no bfloat16 kernel at all (``bf16_supported()`` is False and this
    raises ``RuntimeError``)."""
    from .layers import set_dense_dtype

    require_bf16()
    inputs = [mx.sym.var(f"data{i}") for i in range(num_inputs)]
    before = set_dense_dtype(model, "bfloat16")
    try:
        out = model(*inputs)
    finally:
        set_dense_dtype(model, before)
    with warnings.catch_warnings():        # "cannot decide type" of the inputs: float32
        warnings.simplefilter("ignore", UserWarning)
        net = mx.gluon.SymbolBlock(out, inputs, params=model.collect_params())
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def quantize_classifier(model: mx.gluon.HybridBlock, calib_data: Optional[Iterable] = None,
                        backend: str = "auto", num_calib_examples: Optional[int] = 320, batch_size: Optional[int] = 32,
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
            Needed by the ``"onednn"`` backend only (``"bert_gluon"`` scales on the fly).
        backend: ``"auto"``, ``"bert_gluon"`` or ``"onednn"`` (module docstring,
            :func:`resolve_backend`). The arguments below the next one are oneDNN's.
        quantize_output: also quantize the final classification layer (default: keep fp32;
            ``"bert_gluon"`` keeps the pooler and the classifier, which see one vector per
            example, in fp32 always).
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
        raise ValueError(f"INT8 quantization runs on CPU only, got ctx={ctx}")
    output = getattr(model, "output", None)
    kept = [] if quantize_output or output is None else [output.name]
    if resolve_backend(backend) == "bert_gluon":
        return quantize_dense_layers(model, exclude_layers_match=kept)
    if calib_data is None:
        raise ValueError("the onednn INT8 backend needs calib_data: a few hundred training "
                         "examples as (words, valid_length, segments, ...) batches")
    if calib_mode not in ("naive", "entropy"):
        raise ValueError(f"calib_mode must be 'naive' or 'entropy', got {calib_mode!r}")
    if granularity not in ("tensor-wise", "channel-wise"):
        raise ValueError(f"granularity must be 'tensor-wise' or 'channel-wise', "
                         f"got {granularity!r}")
    batches = _as_batches(calib_data, batch_size, num_calib_examples)
    loader = [tuple(mx.nd.array(x, ctx=ctx) for x in b) for b in batches]
    exclude = list(exclude_layers_match) + kept      # e.g. "bertclassifier0_dense1"
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
                              backend: str = "auto", **kwargs) -> mx.gluon.SymbolBlock:
    """INT8 version of a fine-tuned checkpoint (what ``evaluate/predict --int8`` call).

    With the ``"onednn"`` backend it is calibrated on ``num_examples`` random pairs of the
    training data it was fine-tuned on: ``meta`` is the checkpoint's ``config.json``
    (``model.meta``), whose ``task`` (or ``train_file``), ``text_columns``,
    ``label_column``, ``class_labels``, ``max_len`` and ``pair`` choose and transform the
    calibration examples exactly as fine-tuning did. The ``"bert_gluon"`` backend needs no
    data. Other keyword arguments go to :func:`quantize_classifier`.
    """
    from .data import (BERTDatasetTransform, load_task, make_dataloader, read_examples,
                       transform_examples)

    backend = resolve_backend(backend)
    if backend == "bert_gluon":
        return quantize_classifier(model, backend=backend, **kwargs)
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
    return quantize_classifier(model, loader, backend=backend, num_calib_examples=len(samples),
                               batch_size=batch_size, **kwargs)

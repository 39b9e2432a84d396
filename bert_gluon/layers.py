"""Transformer building blocks as Gluon ``HybridBlock``s.

Every block in the encoder works on the *time-major* layout ``(seq_len, batch, units)``
("TNC"): that is the layout MXNet's fused self-attention operators
(``interleaved_matmul_selfatt_qk`` / ``_valatt``) read without copies. ``BERTEncoder``
transposes once on the way in and once on the way out, so users of the model see the
familiar ``(batch, seq_len, units)``.

A padded batch is described by ``valid_length`` (shape ``(batch,)``): keys at
positions ``>= valid_length[b]`` get zero attention weight. ``None`` means no padding.
"""
from __future__ import annotations

from typing import Optional

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from . import ops
from .runtime import BFLOAT16

DENSE_DTYPES = ("float32", "bfloat16")


def _normal(sigma: float) -> mx.init.Initializer:
    return mx.init.Normal(sigma)


def dense(F, X, weight, bias, num_hidden: int, dtype: str = "float32", name=None):
    """``X W^T + b`` over the last axis (``FullyConnected``, ``flatten=False``). With
    ``dtype="bfloat16"`` the product runs on bfloat16 copies of ``X``, ``W`` and ``b`` and the
    result is cast back to float32: mixed precision, the parameters and their gradients (which
    flow back through the casts) stay float32."""
    if dtype == "float32":
        return F.FullyConnected(X, weight, bias, num_hidden=num_hidden, flatten=False, name=name)
    low = [F.amp_cast(a, dtype=BFLOAT16) for a in (X, weight, bias)]
    return F.amp_cast(F.FullyConnected(*low, num_hidden=num_hidden, flatten=False, name=name),
                      dtype="float32")


class Dense(nn.Dense):
    """Gluon's ``nn.Dense`` over the last axis (same parameters), computed in
    ``compute_dtype`` (see :func:`dense` and :func:`set_dense_dtype`)."""

    def __init__(self, units: int, in_units: int, **kwargs):
        super().__init__(units, flatten=False, in_units=in_units, **kwargs)
        self.compute_dtype = "float32"

    def hybrid_forward(self, F, x, weight, bias):
        return dense(F, x, weight, bias, self._units, self.compute_dtype, name="fwd")


def set_dense_dtype(block: HybridBlock, dtype: str) -> str:
    """Compute the encoder's dense layers inside ``block`` -- every layer's fused Q/K/V
    projection, attention output and both feed-forward layers, ~90 % of the work -- in
    ``dtype``: ``"bfloat16"`` (mixed precision on CPUs with AVX-512 BF16, see
    :func:`bert_gluon.runtime.fast_bf16`) or ``"float32"``. Embeddings, attention scores,
    LayerNorm, pooler and heads stay float32; cached graphs are rebuilt on the next call.
    Returns the dtype they had before (``"float32"`` for a block without such layers)."""
    if dtype not in DENSE_DTYPES:
        raise ValueError(f"dense-layer dtype must be one of {DENSE_DTYPES}, got {dtype!r}")
    before = []

    def visit(b):
        if isinstance(b, (Dense, MultiHeadAttention)):
            before.append(b.compute_dtype)
            b.compute_dtype = dtype
        b._clear_cached_op()

    block.apply(visit)
    return before[0] if before else "float32"


class OptionalArgsBlock(HybridBlock):
    """A ``HybridBlock`` whose optional inputs (``valid_length=None``) may switch between
    ``None`` and an array after ``hybridize()``: the cached graph is rebuilt when they do,
    instead of Gluon's "argument structure does not match" error."""

    def __call__(self, *args):
        pattern = tuple(a is None for a in args)
        if getattr(self, "_none_pattern", pattern) != pattern:
            self._clear_cached_op()
        self._none_pattern = pattern
        return super().__call__(*args)


class PositionalEncoding(HybridBlock):
    """Sinusoidal position encoding (Vaswani et al.), added to ``X`` then dropout.

    Kept for the tutorial; real BERT checkpoints use learned position embeddings.
    Works on batch-major input ``(batch, seq_len, units)``.
    """

    def __init__(self, units: int, dropout: float = 0.0, max_length: int = 512, **kwargs):
        super().__init__(**kwargs)
        pos = np.arange(max_length, dtype=np.float32)[:, None]
        div = np.power(10000.0, np.arange(0, units, 2, dtype=np.float32) / units)
        table = np.zeros((max_length, units), dtype=np.float32)
        table[:, 0::2] = np.sin(pos / div)
        table[:, 1::2] = np.cos(pos / div)
        self.max_length, self.units = max_length, units
        self.table = self.params.get_constant("table", table)
        self.dropout = nn.Dropout(dropout)

    def hybrid_forward(self, F, X, table):
        steps = F.contrib.arange_like(X, axis=1)             # (seq_len,)
        enc = F.Embedding(steps, table, self.max_length, self.units)
        return self.dropout(F.broadcast_add(X, F.expand_dims(enc, axis=0)))


class MultiHeadAttention(OptionalArgsBlock):
    """Multi-head self-attention on ``(seq_len, batch, units)``.

    Mathematically, per head ``h`` with ``d = units / num_heads``::

        Q, K, V = X W_q + b_q, X W_k + b_k, X W_v + b_v      (split into heads)
        A = softmax(Q K^T / sqrt(d))       (keys beyond valid_length masked out)
        out = concat_h(dropout(A) V) W_o + b_o

    With ``first_query_only=True`` only the first position's output is returned,
    ``(1, batch, units)``: every key and value still counts, the output projection runs on one
    position instead of ``seq_len``.

    The query/key/value weights are stored separately (so checkpoints map one to one)
    and interleaved per head on the fly into one projection, which lets MXNet's fused
    operators compute all heads' scores and contexts in single batched GEMMs.
    """

    def __init__(self, units: int, num_heads: int, dropout: float = 0.0,
                 weight_initializer: Optional[mx.init.Initializer] = None,
                 first_query_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        if units % num_heads:
            raise ValueError(f"units ({units}) must be divisible by num_heads ({num_heads})")
        self.units, self.num_heads = units, num_heads
        self.first_query_only = first_query_only
        self.compute_dtype = "float32"
        init = weight_initializer or _normal(0.02)
        with self.name_scope():
            for name in ("query", "key", "value"):
                setattr(self, f"{name}_weight",
                        self.params.get(f"{name}_weight", shape=(units, units), init=init))
                setattr(self, f"{name}_bias",
                        self.params.get(f"{name}_bias", shape=(units,), init="zeros"))
            self.proj = Dense(units, in_units=units, weight_initializer=init, prefix="proj_")
            self.dropout = nn.Dropout(dropout)

    def hybrid_forward(self, F, X, valid_length=None, *, query_weight, key_weight, value_weight,
                       query_bias, key_bias, value_bias):
        H = self.num_heads
        # (H, 3*d, units): rows [q_h; k_h; v_h] for each head h, the layout the fused ops expect.
        weight = F.concat(*[w.reshape((H, -1, 0), reverse=True) for w in (query_weight, key_weight,
                                                            value_weight)], dim=1)
        bias = F.concat(*[b.reshape((H, -1), reverse=True) for b in (query_bias, key_bias, value_bias)], dim=1)
        qkv = dense(F, X, weight.reshape((-1, 0), reverse=True), bias.reshape((-1,)),
                    3 * self.units, self.compute_dtype)                     # (T, B, 3*units)
        if ops.use_fast_ops():
            context = self._fused_attention(F, X, qkv, valid_length)
        else:
            context = self._attention(F, X, qkv, valid_length)
        if self.first_query_only:         # only position 0 is wanted: (1, B, units)
            context = F.slice_axis(context, axis=0, begin=0, end=1)
        return self.proj(context)                                           # (T, B, units)

    def _attention(self, F, X, qkv, valid_length):
        """Scores, masked softmax, dropout and the weighted sum with MXNet's operators."""
        H = self.num_heads
        scores = F.contrib.interleaved_matmul_selfatt_qk(qkv, heads=H)      # (B*H, T, T), scaled
        if valid_length is None:
            weights = F.softmax(scores, axis=-1)
        else:
            # softmax wants one key length per (batch*head, query) row: (B*H, T)
            zeros = F.zeros_like(F.contrib.arange_like(X, axis=0)).reshape((1, -1))
            length = F.broadcast_add(F.reshape(valid_length, (-1, 1)), zeros)       # (B, T)
            length = F.broadcast_axis(F.expand_dims(length, axis=1), axis=1, size=H)
            length = F.cast(F.reshape(length, (-3, 0)), "int32")
            weights = F.softmax(scores, length=length, use_length=True, axis=-1)
        return F.contrib.interleaved_matmul_selfatt_valatt(qkv, self.dropout(weights), heads=H)

    def _fused_attention(self, F, X, qkv, valid_length):
        """The same in one compiled CPU operator (``bg_self_attention``, see
        :mod:`bert_gluon.ops`)."""
        if valid_length is None:      # every key valid: length T for each sequence
            valid_length = F.sum(F.ones_like(F.slice_axis(X, axis=2, begin=0, end=1)),
                                 axis=(0, 2))
        return F.bg_self_attention(qkv, F.cast(valid_length, "float32"), ops.mode_flag(F),
                                   heads=self.num_heads, dropout=self.dropout._rate)[0]


class LayerNorm(nn.LayerNorm):
    """Gluon's ``nn.LayerNorm`` over the last axis (same parameters ``gamma``/``beta``).

    ``norm(X)`` is ``LayerNorm(X)``; ``norm(X, Y)`` is ``LayerNorm(X + dropout(Y))`` with
    ``residual_dropout``, the residual connection of a Transformer layer. On CPU both run as
    the compiled ``bg_layer_norm`` / ``bg_add_norm`` operators when available (see
    :mod:`bert_gluon.ops`): one pass over memory, and a backward pass about ten times faster
    than MXNet 1.9's LayerNorm.

    MXNet hands extension operators no write/add request, so their gradients always overwrite:
    ``gamma``/``beta`` pass through ``identity`` (whose backward honours ``grad_req="add"`` for
    gradient accumulation), and the inputs must not themselves be leaves with
    ``grad_req="add"``."""

    def __init__(self, epsilon: float = 1e-5, in_channels: int = 0,
                 residual_dropout: float = 0.0, **kwargs):
        super().__init__(epsilon=epsilon, in_channels=in_channels, **kwargs)
        self._residual_dropout = residual_dropout

    def hybrid_forward(self, F, data, residual=None, gamma=None, beta=None):
        eps, p = self._epsilon, self._residual_dropout
        if ops.use_fast_ops():
            gamma, beta = F.identity(gamma), F.identity(beta)
            if residual is None:
                return F.bg_layer_norm(data, gamma, beta, eps=eps)[0]
            return F.bg_add_norm(data, residual, gamma, beta, ops.mode_flag(F), eps=eps,
                                 dropout=p)[0]
        if residual is not None:
            data = data + (F.Dropout(residual, p=p) if p else residual)
        return F.LayerNorm(data, gamma=gamma, beta=beta, axis=-1, eps=eps)


class AddNorm(HybridBlock):
    """Residual connection then LayerNorm: ``LayerNorm(X + dropout(Y))``."""

    def __init__(self, units: int, dropout: float = 0.0, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.norm = LayerNorm(epsilon=epsilon, in_channels=units, residual_dropout=dropout)

    def hybrid_forward(self, F, X, Y):
        return self.norm(X, Y)


class PositionWiseFFN(HybridBlock):
    """Two dense layers applied at every position: ``Dense(units)(GELU(Dense(hidden)(X)))``.

    GELU is the exact (erf) form used by BERT checkpoints.
    """

    def __init__(self, units: int, hidden_size: int,
                 weight_initializer: Optional[mx.init.Initializer] = None, **kwargs):
        super().__init__(**kwargs)
        init = weight_initializer or _normal(0.02)
        with self.name_scope():
            self.dense1 = Dense(hidden_size, in_units=units, weight_initializer=init)
            self.activation = nn.GELU()
            self.dense2 = Dense(units, in_units=hidden_size, weight_initializer=init)

    def hybrid_forward(self, F, X):
        return self.dense2(self.activation(self.dense1(X)))


class EncoderBlock(OptionalArgsBlock):
    """One post-LayerNorm Transformer encoder layer, as in BERT::

        Y = AddNorm(X, MultiHeadAttention(X))
        Z = AddNorm(Y, PositionWiseFFN(Y))

    ``first_token_only=True`` returns only ``Z[0]``, ``(1, batch, units)``, computed from all
    positions' keys and values but with the residuals and the feed-forward network on position
    0 alone: all a classifier reads from the last layer, for about a quarter of its work.
    """

    def __init__(self, units: int, hidden_size: int, num_heads: int, dropout: float = 0.0,
                 attention_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12,
                 weight_initializer: Optional[mx.init.Initializer] = None,
                 first_token_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.first_token_only = first_token_only
        with self.name_scope():
            self.attention = MultiHeadAttention(units, num_heads, attention_dropout,
                                                weight_initializer=weight_initializer,
                                                first_query_only=first_token_only)
            self.addnorm1 = AddNorm(units, dropout, layer_norm_eps)
            self.ffn = PositionWiseFFN(units, hidden_size, weight_initializer=weight_initializer)
            self.addnorm2 = AddNorm(units, dropout, layer_norm_eps)

    def hybrid_forward(self, F, X, valid_length=None):
        A = self.attention(X, valid_length)
        if self.first_token_only:
            X = F.slice_axis(X, axis=0, begin=0, end=1)
        Y = self.addnorm1(X, A)
        return self.addnorm2(Y, self.ffn(Y))

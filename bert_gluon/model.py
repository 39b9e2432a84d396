"""BERT, top to bottom: encoder, pre-training heads, and the models built from them.

    words, segments ──► BERTEncoder ──► (batch, seq_len, units)
                                   ├──► MLMDecoder(masked positions) ──► (batch, P, vocab)
                                   ├──► NSClassifier (first token)   ──► (batch, 2)
                                   └──► Pooler ─► Dropout ─► Dense   ──► (batch, num_classes)
                                        (or MeanPooler: the mean over the real tokens)

Parameter names follow the block structure (``encoder.blocks.0.attention.query_weight``),
so a checkpoint maps one to one; see :mod:`bert_gluon.checkpoints` for the translation
to GluonNLP and Hugging Face names.
"""
from __future__ import annotations

from typing import Optional

import mxnet as mx
from mxnet.gluon import HybridBlock, Parameter, nn

from .config import POOLINGS, BERTConfig
from .layers import EncoderBlock, LayerNorm, OptionalArgsBlock, PositionalEncoding

__all__ = ["BERTEncoder", "MLMDecoder", "Pooler", "MeanPooler", "NSClassifier", "BERTModel",
           "BERTForPretraining", "BERTClassifier", "POOLINGS"]


class BERTEncoder(OptionalArgsBlock):
    """Token + segment + position embeddings, LayerNorm, dropout, then ``num_layers`` blocks.

    ``forward(words, segments, valid_length=None)`` takes ``(batch, seq_len)`` token ids and
    segment ids and returns ``(batch, seq_len, units)``; with ``first_token_only=True`` only
    the first token's output, ``(batch, 1, units)``, from a last layer that skips the rest
    (see ``EncoderBlock``): what a classifier on ``[CLS]`` needs.
    """

    def __init__(self, vocab_size: int, units: int, hidden_size: int, num_heads: int,
                 num_layers: int, dropout: float, max_length: int = 512, type_vocab_size: int = 2,
                 attention_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12,
                 position: str = "learned", initializer_range: float = 0.02,
                 first_token_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        if position not in ("learned", "sinusoidal"):
            raise ValueError(f"position must be 'learned' or 'sinusoidal', got {position!r}")
        self.max_length, self.position = max_length, position
        init = mx.init.Normal(initializer_range)
        with self.name_scope():
            self.word_embed = nn.Embedding(vocab_size, units, weight_initializer=init)
            self.segment_embed = nn.Embedding(type_vocab_size, units, weight_initializer=init)
            if position == "learned":
                self.position_embed = nn.Embedding(max_length, units, weight_initializer=init)
            else:
                self.position_embed = PositionalEncoding(units, 0.0, max_length)
            self.embed_norm = LayerNorm(epsilon=layer_norm_eps, in_channels=units)
            self.embed_dropout = nn.Dropout(dropout)
            self.blocks = nn.HybridSequential()
            for i in range(num_layers):
                self.blocks.add(EncoderBlock(units, hidden_size, num_heads, dropout,
                                             attention_dropout, layer_norm_eps,
                                             weight_initializer=init,
                                             first_token_only=first_token_only
                                             and i == num_layers - 1))

    @classmethod
    def from_config(cls, config: BERTConfig, **kwargs) -> "BERTEncoder":
        return cls(config.vocab_size, config.units, config.hidden_size, config.num_heads,
                   config.num_layers, config.dropout, max_length=config.max_length,
                   type_vocab_size=config.type_vocab_size,
                   attention_dropout=config.attention_dropout,
                   layer_norm_eps=config.layer_norm_eps, position=config.position,
                   initializer_range=config.initializer_range, **kwargs)

    def hybrid_forward(self, F, words, segments, valid_length=None):
        X = self.word_embed(words) + self.segment_embed(segments)          # (B, T, C)
        if self.position == "learned":
            steps = F.contrib.arange_like(words, axis=1)                    # 0, 1, ..., T-1
            X = F.broadcast_add(X, F.expand_dims(self.position_embed(steps), axis=0))
        else:
            X = self.position_embed(X)
        X = self.embed_dropout(self.embed_norm(X))
        X = F.transpose(X, axes=(1, 0, 2))                                  # (T, B, C)
        for block in self.blocks:
            X = block(X, valid_length)
        return F.transpose(X, axes=(1, 0, 2))                               # (B, T, C)


class MLMDecoder(HybridBlock):
    """Masked-LM head: gather hidden states at masked positions, then
    ``Dense(units) → GELU → LayerNorm → Dense(vocab_size)``.

    ``forward(X, masked_positions)``: ``X`` is ``(batch, seq_len, units)``, ``masked_positions``
    is ``(batch, P)`` indices into ``seq_len``; returns scores ``(batch, P, vocab_size)``.
    Pass ``tied_weight`` (the word-embedding ``Parameter``) to share the output weight
    with the input embedding, as BERT does.
    """

    def __init__(self, vocab_size: int, units: int, layer_norm_eps: float = 1e-12,
                 tied_weight: Optional[Parameter] = None, initializer_range: float = 0.02,
                 **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        init = mx.init.Normal(initializer_range)
        with self.name_scope():
            self.transform = nn.Dense(units, flatten=False, in_units=units,
                                      weight_initializer=init)
            self.activation = nn.GELU()
            self.norm = LayerNorm(epsilon=layer_norm_eps, in_channels=units)
            if tied_weight is None:
                self.output_weight = self.params.get("output_weight", shape=(vocab_size, units),
                                                     init=init)
            else:
                if tied_weight.shape is not None and tuple(tied_weight.shape) != (vocab_size, units):
                    raise ValueError(f"tied_weight has shape {tied_weight.shape}, expected "
                                     f"{(vocab_size, units)}")
                self.output_weight = tied_weight   # shared, owned by the word embedding
            self.output_bias = self.params.get("output_bias", shape=(vocab_size,), init="zeros")

    def hybrid_forward(self, F, X, masked_positions, output_weight, output_bias):
        # index pairs (b, masked_positions[b, p]) -> (batch, P, units)
        batch_idx = F.broadcast_like(F.reshape(F.contrib.arange_like(masked_positions, axis=0),
                                               (-1, 1)), masked_positions)
        index = F.stack(batch_idx, F.cast(masked_positions, "float32"), axis=0)
        H = F.gather_nd(X, index)
        H = self.norm(self.activation(self.transform(H)))
        return F.FullyConnected(H, output_weight, output_bias, num_hidden=self.vocab_size,
                                flatten=False)


class Pooler(HybridBlock):
    """``tanh(Dense(X[:, 0, :]))``: the representation of the first (``[CLS]``) token."""

    def __init__(self, units: int, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.dense = nn.Dense(units, activation="tanh", in_units=units,
                                  weight_initializer=mx.init.Normal(initializer_range))

    def hybrid_forward(self, F, X):
        return self.dense(F.squeeze(F.slice_axis(X, axis=1, begin=0, end=1), axis=1))


class MeanPooler(OptionalArgsBlock):
    """The mean of ``X`` over each sequence's first ``valid_length`` positions (padding left
    out): the sentence embedding sentence-transformers models such as all-MiniLM-L6-v2 are
    trained to produce. No parameters.

    ``forward(X, valid_length=None)``: ``X`` is ``(batch, seq_len, units)``; returns
    ``(batch, units)``. Without ``valid_length`` every position counts.
    """

    def hybrid_forward(self, F, X, valid_length=None):
        if valid_length is None:
            return F.mean(X, axis=1)
        # weights 1/valid_length on the real positions, 0 on padding: one batched matmul
        steps = F.reshape(F.contrib.arange_like(X, axis=1), (1, -1))          # (1, T)
        length = F.reshape(F.cast(valid_length, "float32"), (-1, 1))          # (B, 1)
        weights = F.broadcast_div(F.broadcast_lesser(steps, length), length)   # (B, T)
        return F.squeeze(F.batch_dot(F.expand_dims(weights, axis=1), X), axis=1)


class NSClassifier(HybridBlock):
    """Next-sentence head: ``Pooler`` on the first token, then ``Dense(2)``.

    ``forward(X)`` with ``X`` of shape ``(batch, seq_len, units)`` returns ``(batch, 2)``.
    ``vocab_size`` is accepted for compatibility with the tutorial's signature and unused.
    """

    def __init__(self, units: int, vocab_size: Optional[int] = None,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.pooler = Pooler(units, initializer_range)
            self.output = nn.Dense(2, in_units=units,
                                   weight_initializer=mx.init.Normal(initializer_range))

    def hybrid_forward(self, F, X):
        return self.output(self.pooler(X))


class BERTModel(OptionalArgsBlock):
    """Encoder + pooler (Hugging Face's ``BertModel``).

    ``forward(words, segments, valid_length=None)`` returns
    ``(sequence_output (B, T, C), pooled_output (B, C))``.
    """

    def __init__(self, config: BERTConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        with self.name_scope():
            self.encoder = BERTEncoder.from_config(config)
            self.pooler = Pooler(config.units, config.initializer_range)

    def hybrid_forward(self, F, words, segments, valid_length=None):
        seq = self.encoder(words, segments, valid_length)
        return seq, self.pooler(seq)


class BERTForPretraining(HybridBlock):
    """Encoder with both pre-training heads: masked LM (output weight tied to the word
    embedding by default) and next-sentence prediction.

    ``forward(words, segments, valid_length, masked_positions)`` returns
    ``(sequence_output (B, T, C), mlm_scores (B, P, vocab), nsp_scores (B, 2))``.
    """

    def __init__(self, config: BERTConfig, tie_weights: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        with self.name_scope():
            self.encoder = BERTEncoder.from_config(config)
            tied = self.encoder.word_embed.weight if tie_weights else None
            self.mlm = MLMDecoder(config.vocab_size, config.units, config.layer_norm_eps,
                                  tied_weight=tied, initializer_range=config.initializer_range)
            self.nsp = NSClassifier(config.units, initializer_range=config.initializer_range)

    def hybrid_forward(self, F, words, segments, valid_length, masked_positions):
        seq = self.encoder(words, segments, valid_length)
        return seq, self.mlm(seq, masked_positions), self.nsp(seq)


class BERTClassifier(OptionalArgsBlock):
    """Sentence (pair) classifier for fine-tuning: pooled sequence → dropout → Dense.

    ``forward(words, segments, valid_length=None)`` returns ``(batch, num_classes)`` scores
    (use ``num_classes=1`` for regression). ``pooling`` says what the output layer reads:

    - ``"cls"`` (BERT's, Hugging Face's ``BertForSequenceClassification``): the ``Pooler``,
      ``tanh(Dense(·))`` of the first (``[CLS]``) token. The encoder is then built with
      ``first_token_only``: the last layer finishes only that position (the same scores, for
      less work: 12 % of MiniLM-L6's dense-layer work, 6 % of BERT-base's).
    - ``"mean"`` (sentence-transformers'): ``MeanPooler``, the mean of the last layer over
      the real tokens, the representation such checkpoints were trained to produce.
    """

    def __init__(self, config: BERTConfig, num_classes: int = 2,
                 dropout: Optional[float] = None, pooling: str = "cls", **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.config, self.num_classes, self.pooling = config, num_classes, pooling
        with self.name_scope():
            self.encoder = BERTEncoder.from_config(config, first_token_only=pooling == "cls")
            if pooling == "cls":
                self.pooler = Pooler(config.units, config.initializer_range)
            else:
                self.pooler = MeanPooler()
            self.dropout = nn.Dropout(config.dropout if dropout is None else dropout)
            self.output = nn.Dense(num_classes, in_units=config.units,
                                   weight_initializer=mx.init.Normal(config.initializer_range))

    def hybrid_forward(self, F, words, segments, valid_length=None):
        seq = self.encoder(words, segments, valid_length)
        pooled = self.pooler(seq) if self.pooling == "cls" else self.pooler(seq, valid_length)
        return self.output(self.dropout(pooled))

"""Independent NumPy (float64) reference of BERT's forward pass, written from the paper's
equations, used to check the Gluon blocks number by number."""
import math

import mxnet as mx
import numpy as np
from mxnet import nd


def numpy_params(block):
    """A Gluon block's parameters as float64 arrays, by structural name."""
    return {k: v.data().asnumpy().astype(np.float64)
            for k, v in block._collect_params_with_prefix().items()}


def init_nontrivial(block, ctx, sigma=0.3, gamma=0.8):
    """Initialise ``block`` with random weights and non-trivial LayerNorm and bias values,
    so that a reference comparison really checks every term."""
    block.initialize(mx.init.Normal(sigma), ctx=ctx)
    for name, p in block.collect_params().items():
        if name.endswith(("gamma", "beta", "bias")):
            p.set_data(nd.random.normal(gamma if name.endswith("gamma") else 0, 0.2,
                                        shape=p.shape, ctx=ctx))
    return block


def erf_gelu(x):
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_attention(X, p, prefix, num_heads, valid_length):
    """Self-attention written out in NumPy on (T, B, C)."""
    T_, B_, C_ = X.shape
    d = C_ // num_heads
    q = X @ p[prefix + "query_weight"].T + p[prefix + "query_bias"]
    k = X @ p[prefix + "key_weight"].T + p[prefix + "key_bias"]
    v = X @ p[prefix + "value_weight"].T + p[prefix + "value_bias"]
    out = np.zeros_like(X)
    for b in range(B_):
        L = T_ if valid_length is None else int(valid_length[b])
        for h in range(num_heads):
            s = slice(h * d, (h + 1) * d)
            scores = q[:, b, s] @ k[:L, b, s].T / math.sqrt(d)            # (T, L)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, b, s] = w @ v[:L, b, s]
    return out @ p[prefix + "proj.weight"].T + p[prefix + "proj.bias"]


def np_encoder_block(x, p, prefix, num_heads, valid_length, eps=1e-12):
    """One post-LN block on (T, B, C)."""
    y = layer_norm(x + np_attention(x, p, prefix + "attention.", num_heads, valid_length),
                   p[prefix + "addnorm1.norm.gamma"], p[prefix + "addnorm1.norm.beta"], eps)
    f = erf_gelu(y @ p[prefix + "ffn.dense1.weight"].T + p[prefix + "ffn.dense1.bias"])
    f = f @ p[prefix + "ffn.dense2.weight"].T + p[prefix + "ffn.dense2.bias"]
    return layer_norm(y + f, p[prefix + "addnorm2.norm.gamma"], p[prefix + "addnorm2.norm.beta"], eps)


def np_bert_encoder(words, segments, p, num_layers, num_heads, valid_length, eps=1e-12,
                    prefix="encoder."):
    """Embeddings (word + segment + learned position) -> LayerNorm -> blocks; returns (B, T, C)."""
    x = (p[prefix + "word_embed.weight"][words] + p[prefix + "segment_embed.weight"][segments]
         + p[prefix + "position_embed.weight"][np.arange(words.shape[1])][None])
    x = layer_norm(x, p[prefix + "embed_norm.gamma"], p[prefix + "embed_norm.beta"], eps)
    x = x.transpose(1, 0, 2)
    for i in range(num_layers):
        x = np_encoder_block(x, p, f"{prefix}blocks.{i}.", num_heads, valid_length, eps)
    return x.transpose(1, 0, 2)

"""Transformer blocks: shapes, hybridize == imperative, masking, gradients, and a NumPy reference."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

from bert_gluon import AddNorm, EncoderBlock, MultiHeadAttention, PositionalEncoding, PositionWiseFFN
from np_reference import init_nontrivial, numpy_params, erf_gelu, layer_norm, np_attention, np_encoder_block

T, B, C, H, FFN = 7, 3, 16, 4, 32




def _x(ctx, shape=(T, B, C), seed=0):
    return nd.array(np.random.RandomState(seed).randn(*shape), ctx=ctx)


def test_multi_head_attention_matches_numpy(ctx):
    att = init_nontrivial(MultiHeadAttention(C, H, dropout=0.0), ctx, sigma=0.5)
    X = _x(ctx)
    vl = nd.array([7, 3, 1], ctx=ctx)
    p = numpy_params(att)
    for valid in (None, vl):
        out = att(X, valid)
        assert out.shape == (T, B, C)
        ref = np_attention(X.asnumpy().astype(np.float64), p, "", H,
                            None if valid is None else valid.asnumpy())
        np.testing.assert_allclose(out.asnumpy(), ref, rtol=1e-4, atol=1e-5)


def test_encoder_block_matches_numpy(ctx):
    blk = init_nontrivial(EncoderBlock(C, FFN, H, dropout=0.1, layer_norm_eps=1e-12), ctx)
    X = _x(ctx, seed=1)
    vl = nd.array([5, 7, 2], ctx=ctx)
    out = blk(X, vl)
    ref = np_encoder_block(X.asnumpy().astype(np.float64), numpy_params(blk), "", H, vl.asnumpy())
    assert out.shape == (T, B, C)
    np.testing.assert_allclose(out.asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_positional_encoding_values(ctx):
    pe = PositionalEncoding(C, dropout=0.0, max_length=50)
    pe.initialize(ctx=ctx)
    X = nd.zeros((2, 9, C), ctx=ctx)
    out = pe(X).asnumpy()
    assert out.shape == (2, 9, C)
    for pos in (0, 3, 8):
        for i in (0, 2, 6):
            angle = pos / 10000 ** (i / C)
            assert out[1, pos, i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert out[1, pos, i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_add_norm_and_ffn_shapes_and_values(ctx):
    an = init_nontrivial(AddNorm(C, dropout=0.5, epsilon=1e-12), ctx)
    ffn = init_nontrivial(PositionWiseFFN(C, FFN), ctx)
    X, Y = _x(ctx, seed=2), _x(ctx, seed=3)
    p = numpy_params(an)
    ref = layer_norm(X.asnumpy() + Y.asnumpy(), p["norm.gamma"], p["norm.beta"], 1e-12)
    np.testing.assert_allclose(an(X, Y).asnumpy(), ref, rtol=1e-4, atol=1e-5)
    assert ffn(X).shape == (T, B, C)


@pytest.mark.parametrize("make", [
    lambda: MultiHeadAttention(C, H, dropout=0.1),
    lambda: EncoderBlock(C, FFN, H, dropout=0.1),
])
def test_hybridized_equals_imperative_and_padding_is_masked(ctx, make):
    blk = init_nontrivial(make(), ctx)
    X = _x(ctx, seed=4)
    vl = nd.array([4, 7, 2], ctx=ctx)
    imperative = [blk(X, vl).asnumpy(), blk(X, None).asnumpy()]
    blk.hybridize(static_alloc=True)
    hybrid = [blk(X, vl).asnumpy(), blk(X, None).asnumpy(), blk(X, vl).asnumpy()]
    np.testing.assert_allclose(hybrid[0], imperative[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hybrid[1], imperative[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(hybrid[2], hybrid[0])  # switching None <-> array works
    # appending garbage after the valid length changes nothing at valid positions
    X2 = nd.concat(X, _x(ctx, (5, B, C), seed=9) * 10, dim=0)
    out2 = blk(X2, vl).asnumpy()
    for b, L in enumerate([4, 7, 2]):
        np.testing.assert_allclose(out2[:L, b], hybrid[0][:L, b], rtol=1e-4, atol=1e-5)


def test_block_gradients_reach_every_parameter(ctx):
    blk = init_nontrivial(EncoderBlock(C, FFN, H, dropout=0.1), ctx)
    X = _x(ctx, seed=5)
    with autograd.record():
        loss = (blk(X, nd.array([7, 5, 3], ctx=ctx)) ** 2).sum()
    loss.backward()
    for name, p in blk.collect_params().items():
        assert float(nd.norm(p.grad(ctx)).asscalar()) > 0, name


def test_dropout_only_in_training(ctx):
    blk = init_nontrivial(EncoderBlock(C, FFN, H, dropout=0.3), ctx)
    X = _x(ctx, seed=6)
    a, b = blk(X).asnumpy(), blk(X).asnumpy()
    np.testing.assert_array_equal(a, b)
    with autograd.record(train_mode=True):
        c = blk(X).asnumpy()
    assert np.abs(c - a).max() > 1e-3


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)


def test_bf16_dense_layers_train_like_float32():
    """set_dense_dtype(..., "bfloat16"): every encoder dense layer computes on bfloat16 casts
    (the graph), the loss and each parameter's gradient match float32 to bfloat16 precision,
    and switching back to "float32" gives float32's numbers exactly."""
    from mxnet import gluon

    from bert_gluon import BERTClassifier, BERTConfig
    from bert_gluon.layers import set_dense_dtype
    from bert_gluon.runtime import bf16_supported

    if not bf16_supported():
        pytest.skip("MXNet's oneDNN runs no bfloat16 FullyConnected on this CPU")
    cfg = BERTConfig.preset("tiny", dropout=0.0, attention_dropout=0.0)
    mx.random.seed(3)
    net = BERTClassifier(cfg, num_classes=2)
    net.initialize(mx.init.Normal(0.1))
    net.hybridize(static_alloc=True)
    r = np.random.RandomState(0)
    words = nd.array(r.randint(5, cfg.vocab_size, (8, 12)))
    segments, valid = nd.zeros((8, 12)), nd.array(r.randint(4, 13, 8))
    labels = nd.array(r.randint(0, 2, 8))
    params = {n: p for n, p in net.collect_params().items() if p.grad_req != "null"}

    def loss_and_grads():
        with autograd.record():
            loss = gluon.loss.SoftmaxCELoss()(net(words, segments, valid), labels).mean()
        loss.backward()
        return float(loss.asscalar()), {n: p.grad().asnumpy().copy() for n, p in params.items()}

    loss32, grads32 = loss_and_grads()
    assert set_dense_dtype(net, "bfloat16") == "float32"
    loss16, grads16 = loss_and_grads()
    nodes = net._cached_graph[1].tojson(remove_amp_cast=False)
    # per layer 4 dense layers, each with 3 casts in (x, W, b) and one out
    assert nodes.count('"op": "amp_cast"') == 4 * 4 * cfg.num_layers
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=5e-3)
    largest = max(np.abs(g).max() for g in grads32.values())
    for name, g in grads32.items():
        g16 = grads16[name]
        if name.endswith("key_bias"):   # zero in exact arithmetic: softmax ignores q.b_k
            assert np.abs(g16).max() < 1e-6 * largest, name
            continue
        assert np.abs(g16 - g).max() <= 0.03 * np.abs(g).max(), name
    assert set_dense_dtype(net, "float32") == "bfloat16"
    again, grads = loss_and_grads()
    assert again == loss32
    for name, g in grads32.items():
        np.testing.assert_array_equal(grads[name], g)
    with pytest.raises(ValueError, match="float16"):
        set_dense_dtype(net, "float16")

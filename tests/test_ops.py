"""The compiled CPU operators (bert_gluon.ops): each against MXNet's own operators, forward
and backward, including dropout statistics, repeatability and the fallback when the library
cannot be built."""
import contextlib
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

import bert_gluon as bg
from bert_gluon import ops

pytestmark = pytest.mark.skipif(not ops.load(), reason="bert_gluon's operators did not build")

# (T, B, units, heads): head sizes 8, 16, 32, 24 and lengths that are not whole vectors
SHAPES = [(7, 3, 24, 3), (45, 5, 64, 4), (128, 2, 384, 12), (33, 2, 48, 2)]


def mxnet_attention(qkv, length, heads, dropout=0.0):
    """MXNet 1.9's own operators: what MultiHeadAttention runs without bert_gluon.ops."""
    T = qkv.shape[0]
    scores = nd.contrib.interleaved_matmul_selfatt_qk(qkv, heads=heads)
    rows = nd.broadcast_axis(length.reshape((-1, 1, 1)), axis=(1, 2), size=(heads, T))
    weights = nd.softmax(scores, length=rows.reshape((-1, T)).astype("int32"), use_length=True,
                         axis=-1)
    dropped = nd.Dropout(weights, p=dropout) if dropout else weights
    return nd.contrib.interleaved_matmul_selfatt_valatt(qkv, dropped, heads=heads), weights


def fused_attention(qkv, length, heads, dropout=0.0):
    mode = nd.Dropout(nd.ones((1,)), p=0.5)      # as MultiHeadAttention builds it
    context, lse, _ = nd.bg_self_attention(qkv, length, mode, heads=heads, dropout=dropout)
    return context, lse


def _inputs(T, B, U, seed=0):
    rng = np.random.RandomState(seed)
    qkv = nd.array(rng.randn(T, B, 3 * U))
    length = nd.array(np.r_[T, rng.randint(1, T + 1, size=B - 1)].astype(np.float32))
    return qkv, length, nd.array(rng.randn(T, B, U))


def _run(fn, qkv, length, heads, dctx, dropout=0.0, train=True):
    x = qkv.copy()
    x.attach_grad()
    with autograd.record(train_mode=train):
        context, extra = fn(x, length, heads, dropout)
    context.backward(dctx)
    return context.asnumpy(), extra.asnumpy(), x.grad.asnumpy()


@pytest.mark.parametrize("T,B,U,H", SHAPES)
def test_self_attention_matches_mxnet_operators(T, B, U, H):
    qkv, length, dctx = _inputs(T, B, U)
    c0, weights, g0 = _run(mxnet_attention, qkv, length, H, dctx)
    c1, lse, g1 = _run(fused_attention, qkv, length, H, dctx)
    np.testing.assert_allclose(c1, c0, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5)
    # lse is each row's log-sum-exp of the scaled scores over the valid keys
    scores = nd.contrib.interleaved_matmul_selfatt_qk(qkv, heads=H).asnumpy().astype(np.float64)
    lengths = length.asnumpy().astype(int)
    for b, n in enumerate(lengths):
        rows = scores[b * H:(b + 1) * H, :, :n]
        want = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
        np.testing.assert_allclose(lse[b * H:(b + 1) * H], want, rtol=1e-5, atol=1e-5)
    # keys and values beyond a sequence's length do not matter: change them, same result
    noisy = qkv.asnumpy().copy()
    for b, n in enumerate(lengths):
        noisy[n:, b] = 1e3
    c2, _, g2 = _run(fused_attention, nd.array(noisy), length, H, dctx)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(c2[:n, b], c1[:n, b], rtol=1e-5, atol=2e-6)
        assert np.all(g2[n:, b].reshape(T - n, H, 3, U // H)[:, :, 1:] == 0)   # no grad to them


def test_self_attention_dropout_only_in_training_and_unbiased():
    T, B, U, H, p = 64, 8, 32, 4, 0.3
    rng = np.random.RandomState(1)
    qkv = nd.array(rng.randn(T, B, 3 * U))
    one_key = nd.ones((B,))        # one valid key: weight 1, so context = v_0 * keep / (1 - p)
    with autograd.predict_mode():
        ctx_predict = fused_attention(qkv, one_key, H, p)[0].asnumpy()
    v0 = qkv.asnumpy()[0].reshape(B, H, 3, U // H)[:, :, 2].reshape(B, U)
    np.testing.assert_allclose(ctx_predict, np.broadcast_to(v0, (T, B, U)), rtol=1e-6)

    with autograd.train_mode():
        ctx_train = fused_attention(qkv, one_key, H, p)[0].asnumpy()
    # per (query, sequence, head) either dropped (0) or scaled by 1/(1-p)
    heads = ctx_train.reshape(T, B, H, U // H) / v0.reshape(1, B, H, U // H)
    kept = np.isclose(heads, 1 / (1 - p), rtol=1e-5)
    assert np.all(kept | (heads == 0))
    assert np.all(kept.all(-1) | (~kept).all(-1))       # a whole head's weight at once
    assert abs((~kept[..., 0]).mean() - p) < 0.02       # 2048 draws: 3.5 standard deviations

    # unbiased: averaged over many masks, the context approaches the one without dropout
    qkv2, length2, _ = _inputs(16, 2, 32, seed=3)
    ref = fused_attention(qkv2, length2, 4)[0].asnumpy()
    with autograd.train_mode():
        mean = np.mean([fused_attention(qkv2, length2, 4, 0.5)[0].asnumpy()
                        for _ in range(400)], axis=0)
    print(f"\nmean over 400 masks vs no dropout: {np.abs(mean - ref).mean():.4f} "
          f"(mean |context| {np.abs(ref).mean():.4f})")
    assert np.abs(mean - ref).mean() < 0.1 * np.abs(ref).mean()


def test_self_attention_dropout_repeatable_and_backward_uses_same_mask():
    T, B, U, H, p = 9, 2, 16, 2, 0.4
    qkv, length, dctx = _inputs(T, B, U, seed=4)
    runs = []
    for seed in (7, 7, 8):
        mx.random.seed(seed)
        runs.append(_run(fused_attention, qkv, length, H, dctx, dropout=p))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], runs[2][0])

    # the analytic gradient is that of the function with this very mask: central differences
    # of sum(context * dctx) with the RNG reseeded before each evaluation
    def f(x):
        mx.random.seed(7)
        with autograd.train_mode():
            return float((fused_attention(nd.array(x), length, H, p)[0] * dctx).sum().asscalar())

    x0 = qkv.asnumpy().astype(np.float64)
    grad = runs[0][2]
    rng = np.random.RandomState(0)
    for _ in range(12):
        idx = tuple(rng.randint(s) for s in x0.shape)
        eps = 1e-2
        up, down = x0.copy(), x0.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric = (f(up) - f(down)) / (2 * eps)
        assert numeric == pytest.approx(grad[idx], rel=2e-2, abs=2e-3), idx


def test_layer_norm_matches_mxnet_and_accumulates_parameter_gradients():
    rng = np.random.RandomState(0)
    for shape in [(5, 3, 24), (128, 32, 384), (4, 7)]:
        C = shape[-1]
        x = nd.array(rng.randn(*shape) * 3 + 1)
        gamma, beta = nd.array(rng.randn(C)), nd.array(rng.randn(C))
        dy = nd.array(rng.randn(*shape))
        grads = []
        for fast in (False, True):
            args = [a.copy() for a in (x, gamma, beta)]
            for a in args:
                a.attach_grad()
            with autograd.record():
                if fast:
                    y = nd.bg_layer_norm(*args, eps=1e-12)[0]
                else:
                    y = nd.LayerNorm(*args, axis=-1, eps=1e-12)
            y.backward(dy)
            grads.append([y.asnumpy()] + [a.grad.asnumpy() for a in args])
        for got, want in zip(grads[1], grads[0]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # the block: gamma's gradient adds up under grad_req="add" (gradient accumulation)
    norm = bg.layers.LayerNorm(in_channels=6)
    norm.initialize()
    norm.hybridize(static_alloc=True)
    norm.gamma.grad_req = "add"
    x = nd.array(rng.randn(3, 6))
    once = None
    for k in (1, 2):
        with autograd.record():
            y = norm(x)
        y.backward()
        if k == 1:
            once = norm.gamma.grad().asnumpy().copy()
    np.testing.assert_allclose(norm.gamma.grad().asnumpy(), 2 * once, rtol=1e-6)


def _add_norm(x, y, gamma, beta, p, fused, train=True):
    args = [a.copy() for a in (x, y, gamma, beta)]
    for a in args:
        a.attach_grad()
    with autograd.record(train_mode=train):
        if fused:
            out = nd.bg_add_norm(*args, nd.Dropout(nd.ones((1,)), p=0.5), eps=1e-12,
                                 dropout=p)[0]
        else:
            out = nd.LayerNorm(args[0] + args[1], args[2], args[3], axis=-1, eps=1e-12)
    return out, args


def test_add_norm_matches_mxnet_without_dropout():
    rng = np.random.RandomState(2)
    for shape in [(5, 3, 24), (128, 8, 384)]:
        x, y = nd.array(rng.randn(*shape)), nd.array(rng.randn(*shape) * 2)
        gamma, beta = nd.array(rng.randn(shape[-1])), nd.array(rng.randn(shape[-1]))
        dout = nd.array(rng.randn(*shape))
        results = []
        for fused in (False, True):
            out, args = _add_norm(x, y, gamma, beta, 0.0, fused)
            out.backward(dout)
            results.append([out.asnumpy()] + [a.grad.asnumpy() for a in args])
        for got, want in zip(results[1], results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_add_norm_dropout_mask_statistics_and_gradient():
    rng = np.random.RandomState(3)
    shape, p = (64, 16, 96), 0.25
    x, y = nd.array(rng.randn(*shape)), nd.array(rng.randn(*shape))
    gamma, beta = nd.array(rng.rand(96) + 0.5), nd.array(rng.randn(96))
    dout = nd.array(rng.randn(*shape))
    # d y = d x * factor: the mask can be read off the gradients
    for train in (False, True):
        out, (ax, ay, _, _) = _add_norm(x, y, gamma, beta, p, True, train)
        out.backward(dout)
        factor = ay.grad.asnumpy() / ax.grad.asnumpy()
        if not train:
            np.testing.assert_allclose(factor, 1.0, rtol=1e-5)
            continue
        kept = np.isclose(factor, 1 / (1 - p), rtol=1e-4)
        assert np.all(kept | (np.abs(factor) < 1e-6))
        assert abs((~kept).mean() - p) < 0.005          # 98304 draws: 3.5 standard deviations

    # the backward pass uses the forward pass's mask: central differences with the RNG
    # reseeded before each evaluation
    small = [a[:2, :3] for a in (x, y)]
    dsmall = dout[:2, :3]

    def f(xv, yv):
        mx.random.seed(5)
        out, _ = _add_norm(nd.array(xv), nd.array(yv), gamma, beta, p, True)
        return float((out * dsmall).sum().asscalar())

    mx.random.seed(5)
    out, (ax, ay, _, _) = _add_norm(*small, gamma, beta, p, True)
    out.backward(dsmall)
    x0, y0 = (a.asnumpy().astype(np.float64) for a in small)
    for _ in range(10):
        idx = tuple(rng.randint(n) for n in x0.shape)
        for which, grad in ((0, ax.grad.asnumpy()), (1, ay.grad.asnumpy())):
            up, down = [x0.copy(), y0.copy()], [x0.copy(), y0.copy()]
            up[which][idx] += 1e-2
            down[which][idx] -= 1e-2
            numeric = (f(*up) - f(*down)) / 2e-2
            assert numeric == pytest.approx(grad[idx], rel=2e-2, abs=2e-3), (which, idx)


def test_softmax_cross_entropy_matches_log_softmax_and_rejects_bad_labels():
    rng = np.random.RandomState(0)
    scores = nd.array(rng.randn(4, 5, 30522) * 4)
    label = nd.array(rng.randint(0, 30522, size=(4, 5)))
    dloss = nd.array(rng.rand(4, 5))
    results = []
    for F_ops in (False, True):
        s = scores.copy()
        s.attach_grad()
        with autograd.record():
            if F_ops:
                loss = nd.bg_softmax_ce(s, label)[0]
            else:
                loss = -nd.pick(nd.log_softmax(s, axis=-1), label, axis=-1)
        loss.backward(dloss)
        results.append((loss.asnumpy(), s.grad.asnumpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
    with pytest.raises(mx.MXNetError, match="labels outside"):
        nd.bg_softmax_ce(scores, label + 30522)[0].asnumpy()


def test_model_same_with_and_without_compiled_operators():
    """The whole BERTForPretraining (attention, LayerNorm, MLM loss) in both modes, in
    training mode with dropout off: outputs and every parameter's gradient agree."""
    from bert_gluon.pretraining import PretrainingLoss

    config = bg.BERTConfig.preset("tiny", dropout=0.0, attention_dropout=0.0)
    mx.random.seed(0)
    model = bg.BERTForPretraining(config)
    model.initialize(mx.init.Normal(0.05))
    rng = np.random.RandomState(0)
    words = nd.array(rng.randint(0, 1000, (3, 11)))
    segments = nd.array(rng.randint(0, 2, (3, 11)))
    valid = nd.array([11, 6, 9])
    positions = nd.array([[1, 2], [3, 0], [5, 8]])
    masked_ids, weights, nsp = nd.array(rng.randint(0, 1000, (3, 2))), nd.ones((3, 2)), nd.array(
        [0, 1, 1])
    loss_fn = PretrainingLoss()
    results = []
    for builtin in (True, False):
        with ops.builtin_ops() if builtin else contextlib.nullcontext():
            model.hybridize(static_alloc=True)
            loss_fn.hybridize()
            with autograd.record():
                seq, mlm, nsp_scores = model(words, segments, valid, positions)
                loss = loss_fn(mlm, nsp_scores, masked_ids, weights, nsp)[0]
            loss.backward()
        results.append([seq.asnumpy(), loss.asnumpy()] +
                       [p.grad().asnumpy() for p in model.collect_params().values()
                        if p.grad_req != "null"])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fallback_when_the_library_cannot_be_built(tmp_path):
    code = ("import warnings, bert_gluon as bg, mxnet as mx\n"
            "from bert_gluon import ops\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = ops.use_fast_ops()\n"
            "m = bg.BERTModel(bg.BERTConfig.preset('tiny')); m.initialize(); m.hybridize()\n"
            "x = mx.nd.ones((2, 5))\n"
            "print(ok, m(x, x * 0, mx.nd.array([5, 3]))[1].shape, any('compiled' in str(i.message)"
            " for i in w))\n")
    env = dict(os.environ, BERT_GLUON_HOME=str(tmp_path), CXX="/bin/false")
    env.pop("BERT_GLUON_FAST_OPS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "(2,", "64)", "True"]
    env["BERT_GLUON_FAST_OPS"] = "1"      # insisting on them turns the failure into an error
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "building bert_gluon's operators failed" in out.stderr

"""Shared training utilities, against hand-computed values."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from bert_gluon import BERTClassifier, BERTConfig
from bert_gluon import training as T


def tiny_classifier(seed=0, ctx=mx.cpu()):
    mx.random.seed(seed)
    net = BERTClassifier(BERTConfig.preset("tiny", dropout=0.0, attention_dropout=0.0))
    net.initialize(ctx=ctx)
    return net


def batch(ctx=mx.cpu(), n=4):
    rng = np.random.RandomState(0)
    words = mx.nd.array(rng.randint(5, 1000, size=(n, 6)), ctx=ctx)
    segments = mx.nd.array(rng.randint(0, 2, size=(n, 6)), ctx=ctx)
    valid = mx.nd.array([6, 4, 5, 3][:n], ctx=ctx)
    label = mx.nd.array([0, 1, 1, 0][:n], ctx=ctx)
    return words, segments, valid, label


def test_no_weight_decay_on_bias_and_layernorm():
    net = tiny_classifier()
    trainer = T.create_trainer(net, "bertadam", 1e-3, weight_decay=0.01)
    mults = {n: p.wd_mult for n, p in net.collect_params().items()}
    decayed = [n for n, m in mults.items() if m == 1.0]
    exempt = [n for n, m in mults.items() if m == 0.0]
    assert all(n.endswith("_weight") for n in decayed) and decayed
    assert all(n.endswith(("_bias", "_gamma", "_beta")) for n in exempt) and exempt
    assert any("layernorm" in n and n.endswith("_gamma") for n in exempt)
    assert trainer.optimizer.wd == 0.01 and trainer.learning_rate == 1e-3
    with pytest.raises(ValueError, match="unknown optimizer"):
        T.create_trainer(net, "sgdx")
    assert type(T.create_trainer(net, "lamb", 1e-3).optimizer).__name__ == "LAMB"


def test_bertadam_step_matches_hand_computed_adamw():
    """One BERTAdam update with decoupled weight decay, against the formula by hand:
    w -= lr * (m / (sqrt(v) + eps) + wd * w) with m = (1-b1) g, v = (1-b2) g^2 (no bias
    correction, as in BERT's optimizer); biases get no decay."""
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(mx.init.Constant(0.5))
    x = mx.nd.array([[1.0, 2.0, 3.0]])
    trainer = T.create_trainer(net, "bertadam", learning_rate=0.1, weight_decay=0.01)
    with autograd.record():
        loss = (net(x) ** 2).sum()
    loss.backward()
    g = {n: p.grad().asnumpy().copy() for n, p in net.collect_params().items()}
    w0 = {n: p.data().asnumpy().copy() for n, p in net.collect_params().items()}
    T.optimizer_step(trainer, max_grad_norm=None)
    for name, p in net.collect_params().items():
        m, v = 0.1 * g[name], 0.001 * g[name] ** 2
        wd = 0.0 if name.endswith("bias") else 0.01
        expected = w0[name] - 0.1 * (m / (np.sqrt(v) + 1e-6) + wd * w0[name])
        # atol: MXNet's fused kernel works in float32 (1 - beta2 rounds); the decay term
        # alone moves the weight by lr * wd * w = 5e-4, far outside the tolerance
        np.testing.assert_allclose(p.data().asnumpy(), expected, rtol=0, atol=2e-5)


def test_warmup_linear_schedule_values():
    s = T.WarmupLinearSchedule(1.0, total_steps=10, warmup_steps=4)
    got = [s(i) for i in range(1, 11)]
    want = [0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    np.testing.assert_allclose(got, want)
    assert T.WarmupLinearSchedule.from_ratio(5e-5, 345, 0.1).warmup_steps == 34
    with pytest.raises(ValueError):
        T.WarmupLinearSchedule(1.0, 10, 11)


def test_clip_gradients_global_norm():
    a = gluon.Parameter("a", shape=(2,))
    b = gluon.Parameter("b", shape=(1,))
    for p, g in ((a, [3.0, 4.0]), (b, [12.0])):
        p.initialize(ctx=mx.cpu())
        p.grad()[:] = mx.nd.array(g)
    norm = T.clip_gradients([a, b], max_norm=6.5)           # sqrt(9 + 16 + 144) = 13
    assert math.isclose(float(norm.asscalar()), 13.0, rel_tol=1e-6)
    np.testing.assert_allclose(a.grad().asnumpy(), [1.5, 2.0], rtol=1e-5)
    np.testing.assert_allclose(b.grad().asnumpy(), [6.0], rtol=1e-5)
    T.clip_gradients([a, b], max_norm=100.0)                # below the limit: unchanged
    np.testing.assert_allclose(a.grad().asnumpy(), [1.5, 2.0], rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
    """Two half batches with grad_req='add' and accumulate=2 give the same update as one
    full batch (mean loss), clipping included."""
    words, segments, valid, label = batch()
    loss_fn = gluon.loss.SoftmaxCELoss()
    full = tiny_classifier(seed=3)
    t_full = T.create_trainer(full, "bertadam", 1e-2)
    with autograd.record():
        loss = loss_fn(full(words, segments, valid), label).mean()
    loss.backward()
    T.optimizer_step(t_full, max_grad_norm=0.5)

    acc = tiny_classifier(seed=3)
    t_acc = T.create_trainer(acc, "bertadam", 1e-2)
    T.set_grad_accumulation(acc, 2)
    for sl in (slice(0, 2), slice(2, 4)):
        with autograd.record():
            loss = loss_fn(acc(words[sl], segments[sl], valid[sl]), label[sl]).mean()
        T.backward(loss, t_acc)
    T.optimizer_step(t_acc, max_grad_norm=0.5, accumulate=2)
    for (n, p), q in zip(full.collect_params().items(), acc.collect_params().values()):
        np.testing.assert_allclose(p.data().asnumpy(), q.data().asnumpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=n)
    assert all(float(p.grad().abs().sum().asscalar()) == 0.0 for p in T.trainable_params(acc))


def test_training_state_roundtrip(tmp_path):
    """Saving after one update and resuming gives the same second update as never stopping
    (the optimizer moments are restored)."""
    words, segments, valid, label = batch()
    loss_fn = gluon.loss.SoftmaxCELoss()

    def step(net, trainer):
        with autograd.record():
            loss = loss_fn(net(words, segments, valid), label).mean()
        loss.backward()
        T.optimizer_step(trainer, 1.0)

    a = tiny_classifier(seed=5)
    ta = T.create_trainer(a, "bertadam", 1e-2)
    step(a, ta)
    np.random.seed(7)
    T.save_training_state(str(tmp_path / "s"), ta, a, epoch=1, step=1)
    expected_draw = np.random.rand()
    step(a, ta)

    b = tiny_classifier(seed=99)                             # different weights
    tb = T.create_trainer(b, "bertadam", 1e-2)
    np.random.seed(123)
    meta = T.load_training_state(str(tmp_path / "s"), tb, b)
    assert meta == {"epoch": 1, "step": 1}
    assert np.random.rand() == expected_draw                 # NumPy RNG restored
    step(b, tb)
    for p, q in zip(a.collect_params().values(), b.collect_params().values()):
        np.testing.assert_allclose(p.data().asnumpy(), q.data().asnumpy(), rtol=1e-5, atol=1e-7)
    assert T.load_training_state(str(tmp_path / "none"), tb, b) is None


def test_adamw_matches_torch_adamw():
    """'adamw' (bias-corrected) against torch.optim.AdamW, three steps, decay off on bias."""
    torch = pytest.importorskip("torch", reason="torch is the reference for AdamW")
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(mx.init.Normal(0.5))
    tw = torch.nn.Parameter(torch.tensor(net.weight.data().asnumpy()))
    tb = torch.nn.Parameter(torch.tensor(net.bias.data().asnumpy()))
    ref = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.01},
                             {"params": [tb], "weight_decay": 0.0}], lr=0.1, eps=1e-6)
    trainer = T.create_trainer(net, "adamw", learning_rate=0.1, weight_decay=0.01)
    X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], dtype=np.float32)
    for step in range(1, 4):
        with autograd.record():
            loss = (net(mx.nd.array(X * step)) ** 2).sum()
        loss.backward()
        T.optimizer_step(trainer, max_grad_norm=None)
        ref.zero_grad()
        ((torch.tensor(X * step) @ tw.T + tb) ** 2).sum().backward()
        ref.step()
        # each step moves weights by ~0.1; float32 kernels agree to ~1e-5
        np.testing.assert_allclose(net.weight.data().asnumpy(), tw.detach().numpy(), atol=3e-5)
        np.testing.assert_allclose(net.bias.data().asnumpy(), tb.detach().numpy(), atol=3e-5)

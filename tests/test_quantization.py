"""INT8 inference (bert_gluon.quantization), both backends, against the fp32 model it came
from, and bert_gluon's ``bg_int8_dense`` operator against an integer reference in NumPy.

Reference: the same BERTClassifier in fp32. Tolerance (tiny model, 64 held-out pairs of
random lengths): predicted classes agree on >= 90% of examples, and every logit is within
3% of the fp32 logits' range (max - min) of its fp32 value. An INT8 graph that were wrong
(bad scales, wrong masking, no quantization) misses one of these or the op-count check;
calibrating on a single constant batch, for one, gives 3.4% and fails.
"""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import bert_gluon  # noqa: F401
from bert_gluon import BERTClassifier, BERTConfig
from bert_gluon import ops
from bert_gluon.runtime import bf16_supported
from bert_gluon.quantization import (bf16_dense_layers, pack_int8_weight,
                                    quantize_classifier, quantize_dense_layers,
                                    resolve_backend)

CFG = BERTConfig.preset("tiny", dropout=0.0, attention_dropout=0.0)
T = 24


def _batch(n, seed, T=T):
    """(words, valid_length, segments) like bert_gluon.data's loaders, padded with 0."""
    r = np.random.RandomState(seed)
    valid = r.randint(6, T + 1, size=n).astype("float32")
    words = r.randint(5, CFG.vocab_size, size=(n, T)).astype("float32")
    pos = np.arange(T)[None, :]
    words[pos >= valid[:, None]] = 0
    segments = ((pos >= valid[:, None] // 2) & (pos < valid[:, None])).astype("float32")
    return words, valid, segments


def _fp32_model(pooling="cls"):
    mx.random.seed(7)
    net = BERTClassifier(CFG, num_classes=3, pooling=pooling)
    net.initialize(mx.init.Normal(0.1))
    net.output.weight.set_data(net.output.weight.data() * 20)   # logits spread over ~2 units
    net.hybridize(static_alloc=True)
    return net


@pytest.fixture(scope="module")
def models():
    net = _fp32_model()
    calib = [_batch(32, seed) for seed in range(6)]           # 192 calibration examples
    qnet = quantize_classifier(net, calib, backend="onednn", num_calib_examples=160,
                               batch_size=32)
    return net, qnet


@pytest.fixture(scope="module")
def bg_models():
    if not ops.use_fast_ops():
        pytest.skip("bert_gluon's operators did not build")
    net = _fp32_model()
    return net, quantize_classifier(net, backend="bert_gluon")


def _run(net, words, valid, segments):
    return net(mx.nd.array(words), mx.nd.array(segments), mx.nd.array(valid)).asnumpy()


@pytest.mark.parametrize("length", [T, 16])
@pytest.mark.parametrize("backend", ["onednn", "bert_gluon"])
def test_int8_agrees_with_fp32(models, bg_models, backend, length):
    net, qnet = models if backend == "onednn" else bg_models
    words, valid, segments = _batch(64, seed=100, T=length)
    fp32 = _run(net, words, valid, segments)
    int8 = _run(qnet, words, valid, segments)
    assert int8.shape == fp32.shape == (64, 3)
    scale = fp32.max() - fp32.min()
    assert scale > 1.0                                   # the logits are not all equal
    assert np.abs(int8 - fp32).max() <= 0.03 * scale
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("low", ["bert_gluon", "bf16"])
def test_mean_pooled_classifier_in_low_precision(low):
    """pooling="mean" (no pooler layer; the last layer finishes every token): its INT8 and
    bf16 graphs agree with fp32 within the same bounds as the [CLS] model's, padding still
    counts for nothing, and only the encoder's dense layers change precision."""
    net = _fp32_model("mean")
    if low == "bert_gluon":
        if not ops.use_fast_ops():
            pytest.skip("bert_gluon's operators did not build")
        qnet, bound = quantize_classifier(net, backend="bert_gluon"), 0.03
    else:
        if not bf16_supported():
            pytest.skip("MXNet's oneDNN runs no bfloat16 FullyConnected on this CPU")
        qnet, bound = bf16_dense_layers(net), 0.005
    words, valid, segments = _batch(64, seed=300)
    fp32 = _run(net, words, valid, segments)
    out = _run(qnet, words, valid, segments)
    scale = fp32.max() - fp32.min()
    err = np.abs(out - fp32).max() / scale
    print(f"mean pooling, {low} vs fp32: max |difference| {100 * err:.2f} % of the logits' "
          f"range ({scale:.2f})")
    assert scale > 0.2 and 0 < err <= bound
    assert (out.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    wide = [np.pad(a, ((0, 0), (0, 8))) for a in (words, segments)]
    np.testing.assert_allclose(_run(qnet, wide[0], valid, wide[1]), out, atol=1e-4)
    nodes = json.loads(qnet._cached_graph[1].tojson(remove_amp_cast=False))["nodes"]
    fp32_fc = [n for n in nodes if n["op"] == "FullyConnected"]
    if low == "bert_gluon":       # 4 per layer become INT8; the output layer is the one left
        assert sum(n["op"] == "bg_int8_dense" for n in nodes) == 4 * CFG.num_layers
        assert len(fp32_fc) == 1
    else:                         # 4 per layer get bfloat16 inputs; + the output layer
        assert len(fp32_fc) == 4 * CFG.num_layers + 1
        assert sum(n["op"] == "amp_cast" and n["attrs"]["dtype"] == "bfloat16"
                   for n in nodes) == 3 * 4 * CFG.num_layers


def test_int8_graph_really_is_quantized(models):
    _, qnet = models
    nodes = json.loads(qnet._cached_graph[1].tojson())["nodes"]
    quantized_fc = [n for n in nodes if n["op"] == "_sg_mkldnn_fully_connected"
                    and n.get("attrs", {}).get("quantized") == "True"]
    # 4 dense layers per block (qkv, proj, ffn1, ffn2) x 2 blocks + pooler; the output stays fp32
    assert len(quantized_fc) == 4 * CFG.num_layers + 1
    assert all("min_calib_range" in n["attrs"] for n in quantized_fc
               if n["attrs"].get("enable_float_output") != "True")


@pytest.mark.parametrize("backend", ["onednn", "bert_gluon", "bf16"])
def test_padding_does_not_change_low_precision_predictions(request, backend):
    fixture = {"onednn": "models", "bert_gluon": "bg_models", "bf16": "bf16_models"}[backend]
    _, qnet = request.getfixturevalue(fixture)
    words, valid, segments = _batch(8, seed=3, T=16)
    wide = [np.pad(a, ((0, 0), (0, 8))) for a in (words, segments)]
    short = _run(qnet, words, valid, segments)
    padded = _run(qnet, wide[0], valid, wide[1])
    np.testing.assert_allclose(short, padded, atol=1e-4)


def test_bad_calibration_data_is_named():
    net = BERTClassifier(CFG)
    net.initialize()
    with pytest.raises(ValueError, match="calib_data is empty"):
        quantize_classifier(net, [], backend="onednn")
    words, valid, segments = _batch(4, 0)
    with pytest.raises(ValueError, match="batch 1"):
        quantize_classifier(net, [(words, valid, segments), (words, segments, valid)],
                            backend="onednn")
    with pytest.raises(ValueError, match="calib_mode"):
        quantize_classifier(net, [(words, valid, segments)], calib_mode="minmax",
                            backend="onednn")
    with pytest.raises(ValueError, match="CPU"):
        quantize_classifier(net, [(words, valid, segments)], ctx=mx.gpu(0))
    with pytest.raises(ValueError, match="calib_data"):
        quantize_classifier(net, backend="onednn")
    with pytest.raises(ValueError, match="INT8 backend"):
        quantize_classifier(net, backend="amx")


def test_quantize_checkpoint_model_calibrates_on_its_training_file(tmp_path):
    from bert_gluon.data import BERTDatasetTransform
    from bert_gluon.finetuning import predict_scores
    from bert_gluon.quantization import quantize_checkpoint_model
    from bert_gluon.tokenization import Tokenizer

    words = [f"w{i}" for i in range(200)]
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = Tokenizer.from_file(str(tmp_path / "vocab.txt"))
    r = np.random.RandomState(0)
    rows = ["s1\ts2\tlabel"] + [
        "\t".join([" ".join(r.choice(words, r.randint(2, 12))),
                   " ".join(r.choice(words, r.randint(2, 12))), str(i % 2)]) for i in range(48)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    meta = {"text_columns": ["s1", "s2"], "label_column": "label", "class_labels": ["0", "1"],
            "max_len": 32, "pair": True}
    mx.random.seed(3)
    net = BERTClassifier(CFG)
    net.initialize(mx.init.Normal(0.1))
    net.output.weight.set_data(net.output.weight.data() * 20)
    net.hybridize(static_alloc=True)

    with pytest.raises(ValueError, match="train_file"):
        quantize_checkpoint_model(net, tok, meta, backend="onednn")
    qnet = quantize_checkpoint_model(net, tok, meta, train_file=str(tmp_path / "train.tsv"),
                                     num_examples=32, batch_size=16, backend="onednn")
    transform = BERTDatasetTransform(tok, 32, ["0", "1"], pad=False)
    samples = [transform(row.split("\t")) for row in rows[1:]]
    fp32 = predict_scores(net, samples, tok.pad_id, mx.cpu(), 16)
    int8 = predict_scores(qnet, samples, tok.pad_id, mx.cpu(), 16)
    # calibrated on only 32 pairs, so 5% of the logit range here instead of 3%
    assert np.abs(int8 - fp32).max() <= 0.05 * (fp32.max() - fp32.min())
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    # bert_gluon's backend scales on the fly: no training file needed
    if ops.use_fast_ops():
        bg = predict_scores(quantize_checkpoint_model(net, tok, meta, backend="bert_gluon"),
                            samples, tok.pad_id, mx.cpu(), 16)
        assert np.abs(bg - fp32).max() <= 0.03 * (fp32.max() - fp32.min())


# --- bert_gluon's own INT8 operator --------------------------------------------------------
def _erf_gelu(x):
    import math

    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _reference_int8_dense(x, weight, bias, act):
    """What bg_int8_dense computes, in NumPy: per-row activation scales, per-unit weight
    scales, exact integer sums, then float32 rescaling, bias and GELU."""
    amax_w = np.abs(weight).max(axis=1)
    ws = np.where(amax_w > 0, amax_w / np.float32(127), 1).astype(np.float32)
    qw = np.clip(np.rint(weight / ws[:, None]), -127, 127).astype(np.int64)
    rows = x.reshape(-1, x.shape[-1])
    amax = np.abs(rows).max(axis=1)
    xs = np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32)
    qx = np.rint(rows * (np.float32(1) / xs)[:, None]).astype(np.int64)
    sums = qx @ qw.T                                              # exact int64
    y = (sums.astype(np.float32) * xs[:, None] * ws[None, :] + bias).astype(np.float32)
    if act == "gelu":
        y = _erf_gelu(y.astype(np.float64)).astype(np.float32)
    return y.reshape(x.shape[:-1] + (weight.shape[0],)), sums


@pytest.fixture
def kernel(request, monkeypatch):
    """Runs each operator test with each kernel this CPU has: AMX tiles, AVX-512 VNNI and the
    portable loop (all three must give the same integer sums)."""
    from bert_gluon.quantization import int8_kernel

    if not ops.use_fast_ops():
        pytest.skip("bert_gluon's operators did not build")
    order = ["plain", "vnni", "amx"]
    if order.index(request.param) > order.index(int8_kernel()):
        pytest.skip(f"this CPU has no {request.param} kernel")
    monkeypatch.setenv("BERT_GLUON_INT8_KERNEL", request.param)
    assert int8_kernel() == request.param
    return request.param


def test_pack_int8_weight_layout():
    r = np.random.RandomState(0)
    w = r.randn(70, 100).astype(np.float32)
    packed, scale = pack_int8_weight(w)
    Np, Kp = 96, 128                                  # 70 -> 3 x 32 units, 100 -> 2 x 64
    assert packed.dtype == np.int8 and packed.shape == (Np * Kp,)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    q = np.rint(w / scale[:, None]).astype(np.int64)
    assert np.abs(q).max() == 127
    for n, k in [(0, 0), (1, 0), (0, 1), (15, 63), (16, 64), (69, 99), (33, 70), (5, 4)]:
        index = ((n // 16) * (Kp // 64) + k // 64) * 1024 + (k % 64) // 4 * 64 + (n % 16) * 4 + k % 4
        assert packed[index] == q[n, k], (n, k)
    assert np.count_nonzero(packed) <= 70 * 100                       # padding is zero
    assert sorted(packed[packed != 0].tolist()) == sorted(q[q != 0].ravel().tolist())
    with pytest.raises(ValueError, match="shape"):
        pack_int8_weight(np.zeros(5, np.float32))


@pytest.mark.parametrize("kernel", ["amx", "vnni", "plain"], indirect=True)
@pytest.mark.parametrize("shape,act", [((37, 100), "none"), ((3, 5, 100), "gelu"),
                                       ((64, 384), "gelu"), ((1, 1536), "none")])
def test_int8_dense_matches_integer_reference(kernel, shape, act):
    r = np.random.RandomState(len(shape) + shape[-1])
    N = 70 if shape[-1] == 100 else 384
    x = (r.randn(*shape) * 2).astype(np.float32)
    x[0, ..., :3] = 0                                   # rows with zeros, one row all zero
    if len(shape) == 2 and shape[0] > 1:
        x[-1] = 0
    w = (r.randn(N, shape[-1]) * 0.05).astype(np.float32)
    b = r.randn(N).astype(np.float32)
    packed, scale = pack_int8_weight(w)
    out = mx.nd.bg_int8_dense(mx.nd.array(x), mx.nd.array(packed, dtype="int8"),
                              mx.nd.array(scale), mx.nd.array(b), num_hidden=N,
                              in_units=shape[-1], act=act).asnumpy()
    want, sums = _reference_int8_dense(x, w, b, act)
    assert out.shape == shape[:-1] + (N,)
    assert np.abs(sums).max() > 1000                   # the sums are not trivially small
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    # and INT8 is close to the float32 layer itself (~1% of the output range)
    fp32 = x @ w.T + b
    fp32 = _erf_gelu(fp32) if act == "gelu" else fp32
    assert np.abs(out - fp32).max() < 0.02 * (fp32.max() - fp32.min())


def test_int8_dense_bad_arguments_are_named():
    if not ops.use_fast_ops():
        pytest.skip("bert_gluon's operators did not build")
    packed, scale = pack_int8_weight(np.ones((8, 16), np.float32))
    args = (mx.nd.array(packed, dtype="int8"), mx.nd.array(scale), mx.nd.zeros(8))
    with pytest.raises(mx.MXNetError, match="in_units"):
        mx.nd.bg_int8_dense(mx.nd.ones((2, 15)), *args, num_hidden=8, in_units=16).wait_to_read()
    with pytest.raises(mx.MXNetError, match="int8"):
        mx.nd.bg_int8_dense(mx.nd.ones((2, 16)), mx.nd.array(packed), *args[1:], num_hidden=8,
                            in_units=16).wait_to_read()
    with pytest.raises(mx.MXNetError, match="act"):
        mx.nd.bg_int8_dense(mx.nd.ones((2, 16)), *args, num_hidden=8, in_units=16,
                            act="relu").wait_to_read()


def test_bert_gluon_int8_graph_replaces_every_encoder_dense_layer(bg_models):
    net, qnet = bg_models
    nodes = json.loads(qnet._cached_graph[1].tojson())["nodes"]
    dense = [n for n in nodes if n["op"] == "bg_int8_dense"]
    # qkv, attention output, ffn1 (+ its GELU), ffn2 per layer; pooler and output stay fp32
    assert len(dense) == 4 * CFG.num_layers
    assert sum(n["attrs"]["act"] == "gelu" for n in dense) == CFG.num_layers
    assert not [n for n in nodes if n["op"] == "LeakyReLU"]
    fp32_fc = [n["name"] for n in nodes if n["op"] == "FullyConnected"]
    assert len(fp32_fc) == 2 and any(net.output.name in name for name in fp32_fc)
    params = qnet.collect_params()
    int8 = [p for p in params.values() if p.dtype == np.int8]
    assert len(int8) == 4 * CFG.num_layers
    assert all(p.grad_req == "null" for p in params.values())


def test_auto_backend_follows_the_cpu(monkeypatch):
    from bert_gluon import quantization

    monkeypatch.setattr(quantization, "fast_int8_kernel", lambda: True)
    assert resolve_backend() == "bert_gluon"
    monkeypatch.setattr(quantization, "fast_int8_kernel", lambda: False)
    assert resolve_backend("auto") == "onednn" and resolve_backend("bert_gluon") == "bert_gluon"


# ---- bfloat16 dense layers ------------------------------------------------------------
# Reference: the same fp32 model (with random biases). bfloat16 keeps 8 significant bits, so
# each dense layer's inputs and weights are rounded to within 0.4 %; the sums stay float32, and
# the logits move by 0.03 % of their range here. Bound: 0.5 %. Dropping the biases, or
# reversing the rows of the weights, moves them by 3.5-6 % and fails; >= 95 % of classes agree.
@pytest.fixture(scope="module")
def bf16_models():
    net = _fp32_model()
    rng = np.random.RandomState(3)
    for name, p in net.collect_params().items():    # biases too (initialized to zero)
        if name.endswith("_bias"):
            p.set_data(mx.nd.array(rng.normal(0, 0.1, p.shape)))
    if not bf16_supported():
        with pytest.raises(RuntimeError, match="bfloat16"):
            bf16_dense_layers(net)
        pytest.skip("MXNet's oneDNN runs no bfloat16 FullyConnected on this CPU "
                    "(the clear error was checked)")
    return net, bf16_dense_layers(net)


@pytest.mark.parametrize("length", [T, 16])
def test_bf16_agrees_with_fp32(bf16_models, length):
    net, bnet = bf16_models
    words, valid, segments = _batch(64, 200 + length, T=length)
    fp32 = _run(net, words, valid, segments)
    bf16 = _run(bnet, words, valid, segments)
    assert bf16.shape == fp32.shape == (64, 3) and bf16.dtype == np.float32
    err = np.abs(bf16 - fp32).max() / (fp32.max() - fp32.min())
    print(f"bf16 vs fp32: max |difference| {100 * err:.2f} % of the logits' range")
    assert 0 < err <= 0.005, err                        # rounded, but only by bfloat16
    assert (bf16.argmax(1) == fp32.argmax(1)).mean() >= 0.95


def test_bf16_graph_casts_every_encoder_dense_layer(bf16_models):
    net, bnet = bf16_models
    nodes = json.loads(bnet._cached_graph[1].tojson(remove_amp_cast=False))["nodes"]
    fc = [n["name"] for n in nodes if n["op"] == "FullyConnected"]
    casts = [n for n in nodes if n["op"] == "amp_cast"]
    # qkv, attention output, ffn1, ffn2 per layer, each with its input, weight and bias cast
    # to bfloat16 and its output back; pooler and output stay float32
    assert len(fc) == 4 * CFG.num_layers + 2
    assert sum(n["attrs"]["dtype"] == "bfloat16" for n in casts) == 3 * 4 * CFG.num_layers
    assert sum(n["attrs"]["dtype"] == "float32" for n in casts) == 4 * CFG.num_layers
    # the model's own float32 parameters, shared; the model itself is still float32
    assert set(bnet.collect_params().values()) <= set(net.collect_params().values())
    _run(net, *_batch(4, 0))
    assert '"amp_cast"' not in net._cached_graph[1].tojson(remove_amp_cast=False)
    # a model training in bfloat16 (finetune --bf16) stays so
    from bert_gluon.layers import set_dense_dtype

    set_dense_dtype(net, "bfloat16")
    bf16_dense_layers(net)
    assert set_dense_dtype(net, "float32") == "bfloat16"


def test_bf16_without_avx512_is_a_clear_error():
    """oneDNN limited to AVX2 (``DNNL_MAX_CPU_ISA``, in a fresh process) has no bfloat16
    kernel: bf16_supported() says so and bf16_dense_layers raises a RuntimeError naming it."""
    code = ("import bert_gluon, mxnet as mx\n"
            "from bert_gluon import BERTClassifier, BERTConfig\n"
            "from bert_gluon.quantization import bf16_dense_layers\n"
            "from bert_gluon.runtime import bf16_supported\n"
            "net = BERTClassifier(BERTConfig.preset('tiny')); net.initialize()\n"
            "print('supported', bf16_supported())\n"
            "try:\n    bf16_dense_layers(net)\n"
            "except RuntimeError as e:\n    print('RuntimeError:', e)\n")
    env = dict(os.environ, DNNL_MAX_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "supported False" in run.stdout
    assert "RuntimeError: MXNet's oneDNN cannot run bfloat16 FullyConnected" in run.stdout

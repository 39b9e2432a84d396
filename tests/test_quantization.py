"""INT8 inference (bert_gluon.quantization) against the fp32 model it came from.

Reference: the same BERTClassifier in fp32. Tolerance (tiny model, 64 held-out pairs of
random lengths): predicted classes agree on >= 90% of examples, and every logit is within
3% of the fp32 logits' range (max - min) of its fp32 value. An INT8 graph that were wrong
(bad scales, wrong masking, no quantization) misses one of these or the op-count check;
calibrating on a single constant batch, for one, gives 3.4% and fails.
"""
import json

import mxnet as mx
import numpy as np
import pytest

import bert_gluon  # noqa: F401
from bert_gluon import BERTClassifier, BERTConfig
from bert_gluon.quantization import quantize_classifier

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


@pytest.fixture(scope="module")
def models():
    mx.random.seed(7)
    net = BERTClassifier(CFG, num_classes=3)
    net.initialize(mx.init.Normal(0.1))
    net.output.weight.set_data(net.output.weight.data() * 20)   # logits spread over ~2 units
    net.hybridize(static_alloc=True)
    calib = [_batch(32, seed) for seed in range(6)]           # 192 calibration examples
    qnet = quantize_classifier(net, calib, num_calib_examples=160, batch_size=32)
    return net, qnet


def _run(net, words, valid, segments):
    return net(mx.nd.array(words), mx.nd.array(segments), mx.nd.array(valid)).asnumpy()


@pytest.mark.parametrize("length", [T, 16])
def test_int8_agrees_with_fp32(models, length):
    net, qnet = models
    words, valid, segments = _batch(64, seed=100, T=length)
    fp32 = _run(net, words, valid, segments)
    int8 = _run(qnet, words, valid, segments)
    assert int8.shape == fp32.shape == (64, 3)
    scale = fp32.max() - fp32.min()
    assert scale > 1.0                                   # the logits are not all equal
    assert np.abs(int8 - fp32).max() <= 0.03 * scale
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_int8_graph_really_is_quantized(models):
    _, qnet = models
    nodes = json.loads(qnet._cached_graph[1].tojson())["nodes"]
    quantized_fc = [n for n in nodes if n["op"] == "_sg_mkldnn_fully_connected"
                    and n.get("attrs", {}).get("quantized") == "True"]
    # 4 dense layers per block (qkv, proj, ffn1, ffn2) x 2 blocks + pooler; the output stays fp32
    assert len(quantized_fc) == 4 * CFG.num_layers + 1
    assert all("min_calib_range" in n["attrs"] for n in quantized_fc
               if n["attrs"].get("enable_float_output") != "True")


def test_padding_does_not_change_int8_predictions(models):
    _, qnet = models
    words, valid, segments = _batch(8, seed=3, T=16)
    wide = [np.pad(a, ((0, 0), (0, 8))) for a in (words, segments)]
    short = _run(qnet, words, valid, segments)
    padded = _run(qnet, wide[0], valid, wide[1])
    np.testing.assert_allclose(short, padded, atol=1e-4)


def test_bad_calibration_data_is_named():
    net = BERTClassifier(CFG)
    net.initialize()
    with pytest.raises(ValueError, match="calib_data is empty"):
        quantize_classifier(net, [])
    words, valid, segments = _batch(4, 0)
    with pytest.raises(ValueError, match="batch 1"):
        quantize_classifier(net, [(words, valid, segments), (words, segments, valid)])
    with pytest.raises(ValueError, match="calib_mode"):
        quantize_classifier(net, [(words, valid, segments)], calib_mode="minmax")
    with pytest.raises(ValueError, match="CPU"):
        quantize_classifier(net, [(words, valid, segments)], ctx=mx.gpu(0))


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
        quantize_checkpoint_model(net, tok, meta)
    qnet = quantize_checkpoint_model(net, tok, meta, train_file=str(tmp_path / "train.tsv"),
                                     num_examples=32, batch_size=16)
    transform = BERTDatasetTransform(tok, 32, ["0", "1"], pad=False)
    samples = [transform(row.split("\t")) for row in rows[1:]]
    fp32 = predict_scores(net, samples, tok.pad_id, mx.cpu(), 16)
    int8 = predict_scores(qnet, samples, tok.pad_id, mx.cpu(), 16)
    # calibrated on only 32 pairs, so 5% of the logit range here instead of 3%
    assert np.abs(int8 - fp32).max() <= 0.05 * (fp32.max() - fp32.min())
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9

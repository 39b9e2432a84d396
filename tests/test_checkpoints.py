"""Our own checkpoint folders: save_pretrained → from_pretrained gives back the same numbers."""
import json
import os

import numpy as np
import pytest

import bert_gluon as bg
import mxnet as mx
from bert_gluon.checkpoints import CheckpointError, save_huggingface
from bert_gluon.tokenization import Tokenizer

TINY = bg.BERTConfig.preset("tiny", vocab_size=40, num_layers=2)


def make_tokenizer(tmp_path, size=TINY.vocab_size) -> Tokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
    path = tmp_path / "vocab_src.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return Tokenizer.from_file(str(path))


def batch(ctx=mx.cpu(), seed=0):
    rng = np.random.RandomState(seed)
    words = mx.nd.array(rng.randint(0, TINY.vocab_size, size=(3, 7)), ctx=ctx)
    segments = mx.nd.array(rng.randint(0, 2, size=(3, 7)), ctx=ctx)
    valid = mx.nd.array([7, 5, 3], ctx=ctx)
    masked = mx.nd.array([[1, 2], [0, 4], [2, 2]], ctx=ctx)
    return words, segments, valid, masked


def random_model(cls, ctx=mx.cpu(), **kwargs):
    mx.random.seed(1)
    model = cls(TINY, **kwargs)
    model.initialize(mx.init.Normal(0.5), ctx=ctx)
    # give LayerNorms and biases non-trivial values so every tensor matters
    for p in model.collect_params().values():
        p.set_data(mx.nd.random.normal(0, 0.5, shape=p.shape, ctx=ctx))
    return model


def test_classifier_round_trip_with_labels(tmp_path, ctx):
    tok = make_tokenizer(tmp_path)
    model = random_model(bg.BERTClassifier, ctx, num_classes=3)
    words, segments, valid, _ = batch(ctx)
    before = model(words, segments, valid).asnumpy()
    out = bg.save_pretrained(model, tok, str(tmp_path / "ckpt"), labels=["a", "b", "c"])
    assert sorted(os.listdir(out)) == ["config.json", "model.params", "vocab.txt"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["model_class"] == "BERTClassifier" and meta["num_classes"] == 3
    assert meta["labels"] == ["a", "b", "c"] and meta["units"] == TINY.units

    again, tok2 = bg.from_pretrained(out, task="classifier", ctx=ctx)
    assert again.num_classes == 3 and again.meta["labels"] == ["a", "b", "c"]
    assert tok2.vocab.idx_to_token == tok.vocab.idx_to_token
    after = again(words, segments, valid).asnumpy()
    print("\nclassifier round trip max|diff|", np.abs(before - after).max())
    np.testing.assert_array_equal(before, after)
    # the plain structural names: Gluon itself reads the file
    plain = bg.BERTClassifier(TINY, num_classes=3)
    plain.load_parameters(os.path.join(out, "model.params"), ctx=ctx)
    np.testing.assert_array_equal(plain(words, segments, valid).asnumpy(), before)


def test_mean_pooled_classifier_round_trip(tmp_path, ctx):
    """The pooling is part of the checkpoint: saved in config.json, used again on load; a
    mean-pooled classifier has no pooler tensors and no Hugging Face class to export to."""
    tok = make_tokenizer(tmp_path)
    model = random_model(bg.BERTClassifier, ctx, num_classes=2, pooling="mean")
    words, segments, valid, _ = batch(ctx)
    before = model(words, segments, valid).asnumpy()
    out = bg.save_pretrained(model, tok, str(tmp_path / "ckpt"))
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["pooling"] == "mean"
    again, _ = bg.from_pretrained(out, task="classifier", ctx=ctx)
    assert again.pooling == "mean"
    np.testing.assert_array_equal(again(words, segments, valid).asnumpy(), before)
    assert not any(n.startswith("pooler") for n in again._collect_params_with_prefix())
    with pytest.raises(CheckpointError, match="pooling='mean' has no Hugging Face class"):
        save_huggingface(again, tok, str(tmp_path / "hf"))
    # asking for the other pooling: the [CLS] pooler is missing, so it starts fresh
    cls, _ = bg.from_pretrained(out, task="classifier", ctx=ctx, pooling="cls")
    assert cls.pooling == "cls" and cls.pooler.dense.weight.shape == (TINY.units, TINY.units)
    with pytest.raises(ValueError, match="pooling= is for task='classifier'"):
        bg.from_pretrained(out, task="model", pooling="mean")
    with pytest.raises(ValueError, match=r"pooling must be one of \('cls', 'mean'\), got 'max'"):
        bg.from_pretrained(out, task="classifier", pooling="max")
    meta["pooling"] = "max"                    # a hand-edited config.json names itself
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: pooling 'max' is not one of"):
        bg.from_pretrained(out, task="classifier")
    # a [CLS] classifier's folder says so too
    cls_dir = bg.save_pretrained(random_model(bg.BERTClassifier, num_classes=2), tok,
                                 str(tmp_path / "cls"))
    assert json.loads(open(os.path.join(cls_dir, "config.json")).read())["pooling"] == "cls"


def test_classifier_head_size_mismatch(tmp_path):
    tok = make_tokenizer(tmp_path)
    out = bg.save_pretrained(random_model(bg.BERTClassifier, num_classes=3), tok,
                             str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"model\.params.*'output\.weight' has 3 classes, "
                                              r"2 were asked for.*fresh_head=True"):
        bg.from_pretrained(out, task="classifier", num_classes=2)
    fresh, _ = bg.from_pretrained(out, task="classifier", num_classes=2, fresh_head=True)
    assert fresh.output.weight.shape == (2, TINY.units)


def test_pretraining_round_trip_and_task_switch(tmp_path, ctx):
    tok = make_tokenizer(tmp_path)
    model = random_model(bg.BERTForPretraining, ctx)
    # tied: the MLM output weight *is* the word embedding
    assert model.mlm.output_weight is model.encoder.word_embed.weight
    words, segments, valid, masked = batch(ctx)
    seq, mlm, nsp = (x.asnumpy() for x in model(words, segments, valid, masked))
    out = bg.save_pretrained(model, tok, str(tmp_path / "pre"))
    again, _ = bg.from_pretrained(out, task="pretraining", ctx=ctx)
    assert again.mlm.output_weight is again.encoder.word_embed.weight
    seq2, mlm2, nsp2 = (x.asnumpy() for x in again(words, segments, valid, masked))
    for a, b in ((seq, seq2), (mlm, mlm2), (nsp, nsp2)):
        np.testing.assert_array_equal(a, b)
    # the same checkpoint as an encoder + pooler: the NSP pooler becomes the model's pooler
    plain, _ = bg.from_pretrained(out, task="model", ctx=ctx)
    seq3, pooled3 = plain(words, segments, valid)
    np.testing.assert_array_equal(seq3.asnumpy(), seq)
    expected_pooled = model.nsp.pooler(mx.nd.array(seq, ctx=ctx)).asnumpy()
    np.testing.assert_allclose(pooled3.asnumpy(), expected_pooled, rtol=0, atol=1e-6)


def test_fresh_heads_are_logged(tmp_path, caplog):
    tok = make_tokenizer(tmp_path)
    out = bg.save_pretrained(random_model(bg.BERTModel), tok, str(tmp_path / "enc"))
    with caplog.at_level("WARNING", logger="bert_gluon.checkpoints"):
        model, _ = bg.from_pretrained(out, task="pretraining")
    heads = sorted(r.getMessage().split(" has no ")[1].split()[0] for r in caplog.records)
    assert heads == ["mlm", "nsp"]
    words, segments, valid, masked = batch()
    assert model(words, segments, valid, masked)[1].shape == (3, 2, TINY.vocab_size)


def test_dropout_override_and_bad_arguments(tmp_path):
    tok = make_tokenizer(tmp_path)
    out = bg.save_pretrained(random_model(bg.BERTModel), tok, str(tmp_path / "enc"))
    model, _ = bg.from_pretrained(out, dropout=0.0, attention_dropout=0.0)
    assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0
    with pytest.raises(TypeError, match="unexpected arguments.*'colour'"):
        bg.from_pretrained(out, colour="red")
    with pytest.raises(ValueError, match="task must be one of"):
        bg.from_pretrained(out, task="tagger")
    with pytest.raises(CheckpointError, match="neither a folder nor a known model name"):
        bg.from_pretrained(str(tmp_path / "nowhere"))


def test_safetensors_reader_and_writer_agree_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="reference: the safetensors package")
    from bert_gluon.checkpoints import read_safetensors, write_safetensors

    rng = np.random.RandomState(0)
    tensors = {"a.weight": rng.randn(3, 5).astype(np.float32),
               "b.position_ids": np.arange(7, dtype=np.int64)[None],
               "c.half": rng.randn(4).astype(np.float16), "d.scalar": np.array(2.5, dtype=np.float32)}
    st.save_file(tensors, str(tmp_path / "ref.safetensors"))
    mine = read_safetensors(str(tmp_path / "ref.safetensors"))
    assert sorted(mine) == sorted(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(mine[name], arr.astype(np.float32)
                                      if arr.dtype.kind == "f" else arr)
    assert mine["b.position_ids"].dtype == np.int64 and mine["c.half"].dtype == np.float32
    write_safetensors(str(tmp_path / "mine.safetensors"), tensors)
    back = st.load_file(str(tmp_path / "mine.safetensors"))
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)


def test_safetensors_bf16_is_widened(tmp_path):
    torch = pytest.importorskip("torch", reason="bf16 reference tensors are written with torch")
    pytest.importorskip("safetensors.torch", reason="reference: the safetensors package")
    from safetensors.torch import save_file

    from bert_gluon.checkpoints import read_safetensors

    x = torch.tensor([[1.0, -2.5, 3.140625], [1e-3, 65280.0, -0.0078125]], dtype=torch.bfloat16)
    save_file({"w": x}, str(tmp_path / "bf16.safetensors"))
    got = read_safetensors(str(tmp_path / "bf16.safetensors"))["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.float().numpy())

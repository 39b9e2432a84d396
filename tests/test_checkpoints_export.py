"""Deployment export (HybridBlock.export → SymbolBlock) and the convert/export CLI."""
import json
import os

import numpy as np

import bert_gluon as bg
import gluonnlp as nlp
import mxnet as mx
from bert_gluon.checkpoints import export_symbol, read_safetensors
from bert_gluon.cli import main
from test_checkpoints import TINY, batch, make_tokenizer, random_model


def test_export_symbol_runs_without_our_classes(tmp_path):
    model = random_model(bg.BERTClassifier, num_classes=3)
    words, segments, valid, _ = batch()
    expected = model(words, segments, valid).asnumpy()
    sym, params = export_symbol(model, str(tmp_path / "clf"), seq_len=7)
    assert os.path.exists(sym) and os.path.exists(params)
    deployed = mx.gluon.SymbolBlock.imports(sym, ["data0", "data1", "data2"], params)
    got = deployed(words, segments, valid).asnumpy()
    print(f"\nexported SymbolBlock vs BERTClassifier max|diff| {np.abs(got - expected).max():.2e}")
    # the export uses MXNet's own LayerNorm (loadable without bert_gluon), the model may use the
    # compiled one (bert_gluon.ops): equal up to float32 rounding
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cli_convert_and_export(tmp_path, capsys):
    tok = make_tokenizer(tmp_path)
    src = bg.save_pretrained(random_model(bg.BERTForPretraining), tok, str(tmp_path / "src"))
    words, segments, valid, masked = batch()
    ref, _ = bg.from_pretrained(src, task="pretraining")
    ref_seq = ref(words, segments, valid, masked)[0].asnumpy()

    # ours → Hugging Face folder → ours again: same numbers
    assert main(["convert", src, str(tmp_path / "hf"), "--to", "huggingface",
                 "--task", "pretraining"]) == 0
    assert "cls.seq_relationship.weight" in read_safetensors(str(tmp_path / "hf" /
                                                                 "model.safetensors"))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"),
                 "--task", "pretraining"]) == 0
    back, _ = bg.from_pretrained(str(tmp_path / "back"), task="pretraining")
    np.testing.assert_array_equal(back(words, segments, valid, masked)[0].asnumpy(), ref_seq)
    meta = json.loads((tmp_path / "back" / "config.json").read_text())
    assert meta["model_class"] == "BERTForPretraining" and meta["source"].endswith("hf")

    # ours → GluonNLP naming: GluonNLP's own BERTModel loads it strictly, with its vocab.json
    assert main(["convert", src, str(tmp_path / "gl"), "--to", "gluonnlp",
                 "--task", "pretraining"]) == 0
    vocab = nlp.vocab.BERTVocab.from_json((tmp_path / "gl" / "vocab.json").read_text())
    assert vocab.idx_to_token == tok.vocab.idx_to_token
    enc = nlp.model.bert.BERTEncoder(num_layers=TINY.num_layers, units=TINY.units,
                                     hidden_size=TINY.hidden_size, max_length=TINY.max_length,
                                     num_heads=TINY.num_heads, dropout=0.0, layer_norm_eps=1e-12)
    gl = nlp.model.BERTModel(enc, len(vocab), token_type_vocab_size=TINY.type_vocab_size,
                             units=TINY.units, embed_size=TINY.units)
    gl.load_parameters(str(tmp_path / "gl" / "gluonnlp.params"))
    gl_seq = gl(words, segments, valid, masked)[0].asnumpy()
    for b, n in enumerate(valid.asnumpy().astype(int)):   # GluonNLP zeroes padded queries
        np.testing.assert_allclose(gl_seq[b, :n], ref_seq[b, :n], rtol=0, atol=1e-5)

    # export for deployment
    assert main(["export", src, str(tmp_path / "dep"), "--seq-len", "7"]) == 0
    out = capsys.readouterr().out
    assert "model-symbol.json" in out and "model-0000.params" in out and "vocab.txt" in out

    # a bad source: one error line naming the problem, exit status 2, no traceback
    assert main(["convert", str(tmp_path / "dep"), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bert-gluon convert: error: ") and "config.json: file not found" in err

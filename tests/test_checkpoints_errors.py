"""Bad checkpoints: each raises one clear error naming the file and the tensor, and no
parameter is set before everything has been validated. Needs neither torch nor network."""
import json
import os
import re
import struct
import sys

import numpy as np
import pytest

import bert_gluon as bg
import mxnet as mx
from bert_gluon.checkpoints import (CheckpointError, read_safetensors, save_huggingface,
                                    write_safetensors)
from test_checkpoints import TINY, make_tokenizer, random_model

WORD = "bert.embeddings.word_embeddings.weight"


@pytest.fixture
def set_data_calls(monkeypatch):
    """Counts Parameter.set_data calls: a failed load must make none (nothing half-loaded)."""
    calls = []
    original = mx.gluon.Parameter.set_data

    def spy(self, data):
        calls.append(self.name)
        return original(self, data)

    monkeypatch.setattr(mx.gluon.Parameter, "set_data", spy)
    return calls


@pytest.fixture
def hf_dir(tmp_path):
    """A Hugging Face folder written from a random tiny pre-training model (with both heads)."""
    tok = make_tokenizer(tmp_path)
    return save_huggingface(random_model(bg.BERTForPretraining), tok, str(tmp_path / "hf"))


@pytest.fixture
def our_dir(tmp_path):
    tok = make_tokenizer(tmp_path)
    return bg.save_pretrained(random_model(bg.BERTModel), tok, str(tmp_path / "ours"))


def edit_tensors(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    tensors = dict(read_safetensors(path))
    fn(tensors)
    write_safetensors(path, tensors)
    return path


def edit_json(path, **changes):
    with open(path) as f:
        obj = json.load(f)
    obj.update(changes)
    with open(path, "w") as f:
        json.dump(obj, f)


def expect_error(set_data_calls, pattern, source, **kwargs):
    with pytest.raises(CheckpointError, match=pattern):
        bg.from_pretrained(source, **kwargs)
    assert set_data_calls == [], "parameters were set before the checkpoint was validated"


def test_the_fixture_folders_load(hf_dir, our_dir, set_data_calls):
    model, _ = bg.from_pretrained(hf_dir, task="pretraining")
    assert len(set_data_calls) == len(model.collect_params().keys())   # the spy sees real loads
    bg.from_pretrained(our_dir)


def test_truncated_safetensors(hf_dir, set_data_calls):
    path = os.path.join(hf_dir, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    expect_error(set_data_calls, rf"model\.safetensors: truncated file: tensor '{re.escape(last)}'",
                 hf_dir)


def test_corrupt_safetensors_header(hf_dir, set_data_calls):
    with open(os.path.join(hf_dir, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    expect_error(set_data_calls, r"model\.safetensors: corrupt safetensors header", hf_dir)
    with open(os.path.join(hf_dir, "model.safetensors"), "wb") as f:
        f.write(b"\x01\x02")
    expect_error(set_data_calls, r"model\.safetensors: truncated safetensors file", hf_dir)


def test_truncated_gluon_params(our_dir, set_data_calls):
    path = os.path.join(our_dir, "model.params")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    expect_error(set_data_calls, r"model\.params: corrupt or truncated MXNet \.params file",
                 our_dir)


def test_config_vocab_size_disagrees_with_vocab_txt(hf_dir, our_dir, set_data_calls):
    edit_json(os.path.join(hf_dir, "config.json"), vocab_size=TINY.vocab_size + 1)
    expect_error(set_data_calls, rf"hf/config\.json: vocab_size {TINY.vocab_size + 1} disagrees "
                                 rf"with .*hf/vocab\.txt \({TINY.vocab_size} tokens\)", hf_dir)
    edit_json(os.path.join(our_dir, "config.json"), vocab_size=TINY.vocab_size - 1)
    expect_error(set_data_calls, r"ours/config\.json: vocab_size .* disagrees with .*ours/vocab",
                 our_dir)


def test_config_vocab_size_disagrees_with_embedding(hf_dir, set_data_calls):
    edit_json(os.path.join(hf_dir, "config.json"), vocab_size=TINY.vocab_size + 2)
    with open(os.path.join(hf_dir, "vocab.txt"), "a", encoding="utf-8") as f:
        f.write("extra1\nextra2\n")
    expect_error(set_data_calls, rf"model\.safetensors: tensor '{WORD[5:]}' \(ours: "
                                 rf"encoder\.word_embed\.weight\) has {TINY.vocab_size} rows but "
                                 rf".*config\.json says vocab_size {TINY.vocab_size + 2}", hf_dir)


def test_missing_tensor(hf_dir, set_data_calls):
    name = "bert.encoder.layer.1.attention.self.key.bias"
    edit_tensors(hf_dir, lambda t: t.pop(name))
    expect_error(set_data_calls, r"model\.safetensors: missing tensor 'encoder\.layer\.1\.attention"
                                 r"\.self\.key\.bias' \(ours: encoder\.blocks\.1\.attention\.key_bias\)",
                 hf_dir)


def test_partial_head_is_missing_tensor_not_fresh_head(hf_dir, set_data_calls):
    edit_tensors(hf_dir, lambda t: t.pop("cls.predictions.transform.dense.bias"))
    expect_error(set_data_calls, r"missing tensor 'cls\.predictions\.transform\.dense\.bias'",
                 hf_dir, task="pretraining")


@pytest.mark.parametrize("name", ["bert.encoder.layer.0.attention.self.rotary.weight",
                                  "bert.encoder.layer.2.output.dense.bias"])   # only 2 layers
def test_unexpected_tensor(hf_dir, set_data_calls, name):
    edit_tensors(hf_dir, lambda t: t.__setitem__(name, np.zeros(3, np.float32)))
    expect_error(set_data_calls, rf"model\.safetensors: unexpected tensor "
                                 rf"'{re.escape(name[5:])}' \(shape \(3,\)\)", hf_dir)


def test_unexpected_tensor_in_our_params(our_dir, set_data_calls):
    path = os.path.join(our_dir, "model.params")
    arrays = mx.nd.load(path)
    arrays["encoder.blocks.0.attention.rotary"] = mx.nd.zeros((2,))
    mx.nd.save(path, arrays)
    expect_error(set_data_calls, r"model\.params: unexpected tensor "
                                 r"'encoder\.blocks\.0\.attention\.rotary'", our_dir)


def test_wrong_shape(hf_dir, set_data_calls):
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    edit_tensors(hf_dir, lambda t: t.__setitem__(name, t[name][:, :-1].copy()))
    expect_error(set_data_calls, rf"model\.safetensors: tensor '{re.escape(name[5:])}' \(ours: "
                                 rf"encoder\.blocks\.0\.ffn\.dense1\.weight\) has shape "
                                 rf"\({TINY.hidden_size}, {TINY.units - 1}\), expected "
                                 rf"\({TINY.hidden_size}, {TINY.units}\)", hf_dir)


def test_bad_config_json(hf_dir, set_data_calls):
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        f.write("{not json")
    expect_error(set_data_calls, r"hf/config\.json: not valid JSON", hf_dir)


def test_unsupported_hf_config(hf_dir, set_data_calls):
    edit_json(os.path.join(hf_dir, "config.json"), hidden_act="relu")
    expect_error(set_data_calls, r"config\.json: hidden_act 'relu' is not supported", hf_dir)


def test_missing_weights_and_torch_bin_without_torch(hf_dir, set_data_calls, monkeypatch):
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    expect_error(set_data_calls, r"hf: no model\.safetensors or pytorch_model\.bin", hf_dir)
    open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").close()
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch → ImportError
    expect_error(set_data_calls, r"pytorch_model\.bin: reading pytorch_model\.bin needs torch",
                 hf_dir)


def test_missing_vocab(our_dir, set_data_calls):
    os.remove(os.path.join(our_dir, "vocab.txt"))
    expect_error(set_data_calls, r"ours/vocab\.txt: vocabulary file not found", our_dir)


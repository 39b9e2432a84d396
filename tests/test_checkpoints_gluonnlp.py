"""Ours vs GluonNLP's own ``BERTModel`` with the same parameters, and the model-zoo cache
(sha1 pins, download through GluonNLP's store from a local HTTP server, offline errors)."""
import collections
import functools
import http.server
import os
import re
import shutil
import threading
import zipfile

import numpy as np
import pytest

import bert_gluon as bg
import gluonnlp as nlp
import mxnet as mx
from bert_gluon.checkpoints import CheckpointError, from_gluonnlp, save_gluonnlp, sha1_of
from gluonnlp.data import utils as data_utils
from gluonnlp.model import bert as gbert
from mxnet.gluon.model_zoo import model_store

TOL = 1e-5
DATASET = "unit_test_corpus_uncased"


def gluonnlp_bert(config: bg.BERTConfig, vocab_size: int):
    """GluonNLP's BERTModel with every head, in its own classes (the reference)."""
    encoder = gbert.BERTEncoder(num_layers=config.num_layers, units=config.units,
                                hidden_size=config.hidden_size, max_length=config.max_length,
                                num_heads=config.num_heads, dropout=0.0,
                                layer_norm_eps=config.layer_norm_eps)
    return nlp.model.BERTModel(encoder, vocab_size, token_type_vocab_size=config.type_vocab_size,
                               units=config.units, embed_size=config.units, use_pooler=True,
                               use_decoder=True, use_classifier=True)


def randomise(net, seed: int, scale: float = 0.05) -> None:
    """Initialise ``net`` (GluonNLP defers shapes to the first batch) with N(0, scale) weights."""
    net.initialize(mx.init.Zero())
    words = mx.nd.ones((1, 4))
    net(words, words, mx.nd.array([4]), mx.nd.array([[0]]))
    rng = np.random.default_rng(seed)
    for p in net.collect_params().values():
        p.set_data(mx.nd.array(rng.standard_normal(p.shape, dtype=np.float32) * scale))
    # LayerNorm gains near one, so activations keep a sensible size
    for name, p in net.collect_params().items():
        if name.endswith("gamma"):
            p.set_data(p.data() + 1)


def inputs(vocab_size: int, batch: int, seq_len: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    words = mx.nd.array(rng.randint(5, vocab_size, size=(batch, seq_len)))
    segments = mx.nd.array((np.arange(seq_len)[None, :] >= seq_len // 2).repeat(batch, 0))
    valid = mx.nd.array([seq_len] + [seq_len - 3 - i for i in range(batch - 1)])
    masked = mx.nd.array([[1, 3, 5]] * batch)
    return words, segments, valid, masked


def compare(ours, ref, words, segments, valid, masked, label: str):
    """Max |diff| over valid positions of sequence output, pooled, MLM and NSP scores."""
    r_seq, r_pooled, r_nsp, r_mlm = (x.asnumpy() for x in ref(words, segments, valid, masked))
    seq, mlm, nsp = (x.asnumpy() for x in ours(words, segments, valid, masked))
    pooled = ours.nsp.pooler(mx.nd.array(seq)).asnumpy()
    lengths = valid.asnumpy().astype(int)
    diffs = {
        "sequence": max(np.abs(seq[b, :n] - r_seq[b, :n]).max() for b, n in enumerate(lengths)),
        "pooled": np.abs(pooled - r_pooled).max(),
        "mlm": np.abs(mlm - r_mlm).max(),
        "nsp": np.abs(nsp - r_nsp).max(),
    }
    print(f"\n{label} vs gluonnlp.model.BERTModel max|diff|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for key, diff in diffs.items():
        assert diff <= TOL, (key, diff)
    return diffs


# --- zoo cache helpers ------------------------------------------------------------------
def synthetic_vocab(size: int) -> nlp.vocab.BERTVocab:
    tokens = [f"w{i}" for i in range(size - 5)]       # + 5 specials BERTVocab adds
    vocab = nlp.vocab.BERTVocab(collections.Counter(tokens))
    assert len(vocab) == size
    return vocab


def zoo_files(tmp_path, net, vocab):
    """Write a .params and a .vocab as GluonNLP's store would; return paths and sha1s."""
    params, vocab_file = tmp_path / "net.params", tmp_path / "net.vocab"
    net.save_parameters(str(params))
    vocab_file.write_text(vocab.to_json(), encoding="utf-8")
    return str(params), sha1_of(str(params)), str(vocab_file), sha1_of(str(vocab_file))


def pin(monkeypatch, model_name, params_sha1, vocab_sha1, hparams=None):
    """Register our test files in GluonNLP's sha1 tables (and, for tiny shapes, hparams)."""
    monkeypatch.setitem(model_store._model_sha1, f"{model_name}_{DATASET}", params_sha1)
    monkeypatch.setitem(data_utils._vocab_sha1, DATASET, [vocab_sha1, ".vocab", {}])
    if hparams is not None:
        monkeypatch.setitem(gbert.bert_hparams, model_name, hparams)


def cache_names(model_name, params_sha1, vocab_sha1):
    return (f"{model_name}_{DATASET}-{params_sha1[:8]}.params",
            f"{DATASET}-{vocab_sha1[:8]}.vocab")


# --- parity ---------------------------------------------------------------------------
def test_bert_base_shape_matches_gluonnlp():
    """GluonNLP → ours: random BERT-base weights converted from a live gluonnlp BERTModel
    (the file path of the same mapping is covered by the zoo-cache tests below)."""
    config = bg.BERTConfig.preset("bert_base")
    vocab = synthetic_vocab(config.vocab_size)
    ref = gluonnlp_bert(config, len(vocab))
    randomise(ref, seed=0, scale=0.02)
    ours, tok = from_gluonnlp(ref, vocab, task="pretraining")
    assert ours.config == config.replace(dropout=0.0, attention_dropout=0.0)
    # GluonNLP's vocabulary re-indexes specials; our tokenizer keeps *its* ids (embedding rows)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (
        vocab[vocab.padding_token], vocab[vocab.cls_token], vocab[vocab.sep_token],
        vocab[vocab.mask_token])
    assert tok.encode("w7 w123") == vocab[["w7", "w123"]]
    compare(ours, ref, *inputs(config.vocab_size, batch=2, seq_len=16), label="BERT-base shape")


def test_minilm_saved_in_gluonnlp_naming_loads_into_gluonnlp(tmp_path):
    """Ours → GluonNLP: real MiniLM weights (+ random pre-training heads), written with
    save_gluonnlp and read by gluonnlp.model.BERTModel.load_parameters."""
    mx.random.seed(3)
    ours, tok = bg.from_pretrained("all-MiniLM-L6-v2", task="pretraining")
    path = save_gluonnlp(ours, str(tmp_path / "minilm_gluonnlp.params"))
    ref = gluonnlp_bert(ours.config, len(tok))
    ref.load_parameters(path)        # strict: no missing, no extra names
    # real tokens of a real sentence pair, one padded row
    a = [tok.cls_id] + tok.encode("the cat sat on the mat .") + [tok.sep_id]
    b = tok.encode("a dog barked at it .") + [tok.sep_id]
    seq_len = len(a) + len(b)
    words = mx.nd.array([a + b, (a + b[:-3])[:seq_len - 3] + [tok.pad_id] * 3])
    segments = mx.nd.array([[0] * len(a) + [1] * len(b)] * 2)
    valid = mx.nd.array([seq_len, seq_len - 3])
    masked = mx.nd.array([[2, 4, len(a) + 1]] * 2)
    compare(ours, ref, words, segments, valid, masked, label="MiniLM shape")


# --- the zoo cache: download, checksum, offline -------------------------------------------
TINY_HP = dict(gbert.bert_hparams["bert_12_768_12"], num_layers=2, units=64, hidden_size=128,
               max_length=32, num_heads=4, embed_size=64)


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A tiny 'bert_12_768_12' and its vocabulary, pinned in GluonNLP's tables."""
    config = bg.BERTConfig(vocab_size=50, units=64, hidden_size=128, num_heads=4, num_layers=2,
                           max_length=32)
    vocab = synthetic_vocab(config.vocab_size)
    ref = gluonnlp_bert(config, len(vocab))
    randomise(ref, seed=1, scale=0.1)
    files = zoo_files(tmp_path, ref, vocab)
    pin(monkeypatch, "bert_12_768_12", files[1], files[3], TINY_HP)
    return config, ref, files


@pytest.fixture
def http_repo(tmp_path, monkeypatch):
    """A local HTTP server laid out like the MXNet repo; MXNET_GLUON_REPO points at it."""
    served = tmp_path / "repo"
    (served / "gluon" / "models").mkdir(parents=True)
    (served / "gluon" / "dataset" / "vocab").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MXNET_GLUON_REPO", f"http://127.0.0.1:{server.server_address[1]}/")
    yield served
    server.shutdown()
    server.server_close()


def publish(served, folder, name, path):
    with zipfile.ZipFile(served / folder / (name[: name.rindex(".")] + ".zip"), "w") as zf:
        zf.write(path, arcname=name)


def test_zoo_download_through_gluonnlp_store(tmp_path, tiny_zoo, http_repo):
    config, ref, (params, p_sha1, vocab_file, v_sha1) = tiny_zoo
    p_name, v_name = cache_names("bert_12_768_12", p_sha1, v_sha1)
    publish(http_repo, "gluon/models", p_name, params)
    publish(http_repo, "gluon/dataset/vocab", v_name, vocab_file)
    root = tmp_path / "cache"
    ours, _ = bg.from_pretrained("bert_12_768_12", task="pretraining", dataset_name=DATASET,
                                 root=str(root))
    assert sorted(os.listdir(root)) == sorted([p_name, v_name])
    assert sha1_of(str(root / p_name)) == p_sha1
    compare(ours, ref, *inputs(config.vocab_size, batch=3, seq_len=10), label="tiny (downloaded)")


def test_zoo_offline_names_file_and_folder(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")   # discard port: refused
    root = tmp_path / "empty_cache"
    p_name, _ = cache_names("bert_12_768_12", tiny_zoo[2][1], tiny_zoo[2][3])
    with pytest.raises(CheckpointError) as err:
        bg.from_pretrained("bert_12_768_12", dataset_name=DATASET, root=str(root))
    msg = str(err.value)
    assert p_name in msg and f"into the folder {root}" in msg and "not in the MXNet model cache" in msg


def test_zoo_default_cache_is_mxnet_home_models(tmp_path, tiny_zoo, monkeypatch):
    """Without root=, files are looked up in $MXNET_HOME/models, as GluonNLP does."""
    params, p_sha1, vocab_file, v_sha1 = tiny_zoo[2]
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxhome"))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    p_name, v_name = cache_names("bert_12_768_12", p_sha1, v_sha1)
    with pytest.raises(CheckpointError, match=re.escape(f"folder {tmp_path / 'mxhome' / 'models'}")):
        bg.from_pretrained("bert_12_768_12", dataset_name=DATASET)
    models = tmp_path / "mxhome" / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(params, models / p_name)
    shutil.copy(vocab_file, models / v_name)
    ours, _ = bg.from_pretrained("bert_12_768_12", dataset_name=DATASET)   # offline, from cache
    assert ours.config.units == 64


def test_zoo_checksum_mismatch(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    params, p_sha1, vocab_file, v_sha1 = tiny_zoo[2]
    root = tmp_path / "cache"
    root.mkdir()
    p_name, v_name = cache_names("bert_12_768_12", p_sha1, v_sha1)
    data = bytearray(open(params, "rb").read())
    data[-5] ^= 0xFF                                     # one flipped byte in a weight
    (root / p_name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{p_name}: checksum mismatch: sha1 [0-9a-f]{{40}}, "
                                              rf"GluonNLP pins {p_sha1}"):
        bg.from_pretrained("bert_12_768_12", dataset_name=DATASET, root=str(root))


def test_zoo_unknown_names():
    with pytest.raises(CheckpointError, match="has no pretrained 'bert_12_768_12' for "
                                              "dataset_name='no_such_corpus'.*book_corpus_wiki"):
        bg.from_pretrained("bert_12_768_12", dataset_name="no_such_corpus")
    with pytest.raises(CheckpointError, match="kobert_news_wiki_ko_cased uses a SentencePiece"):
        bg.from_pretrained("bert_12_768_12", dataset_name="kobert_news_wiki_ko_cased")

"""Data: readers (GLUE MRPC / SST-2, TSV/CSV), bad input, download, transform, batches.

Token ids are checked against the vocabulary file's line numbers (the checkpoint's ids),
hand-written here, not against our own tokenizer's output.
"""
import functools
import hashlib
import http.server
import os
import shutil
import threading

import numpy as np
import pytest

from bert_gluon import data
from bert_gluon.data import BERTDatasetTransform, DataError, read_examples
from bert_gluon.tokenization import Tokenizer
from conftest import data_dir

VOCAB = os.path.join(data_dir("BERT_VOCAB_DIR", "vocab"), "bert-base-uncased-vocab.txt")
MRPC = data_dir("MRPC_DIR", "mrpc")
SST2 = data_dir("SST2_DIR", "sst-2")
need_vocab = pytest.mark.skipif(not os.path.isfile(VOCAB), reason=f"no vocabulary at {VOCAB}")
need_mrpc = pytest.mark.skipif(not os.path.isfile(os.path.join(MRPC, "train.tsv")),
                               reason=f"no MRPC files in {MRPC}")
need_sst2 = pytest.mark.skipif(not os.path.isfile(os.path.join(SST2, "dev.tsv")),
                               reason=f"no SST-2 files in {SST2}")


@pytest.fixture(scope="module")
def tok():
    if not os.path.isfile(VOCAB):
        pytest.skip(f"no vocabulary at {VOCAB}")
    return Tokenizer.from_file(VOCAB)


@functools.lru_cache()
def line_ids():
    """token -> 0-based line number of vocab.txt: the reference ids."""
    with open(VOCAB, encoding="utf-8") as f:
        return {t.rstrip("\n"): i for i, t in enumerate(f)}


def ids(*tokens):
    table = line_ids()
    return [table[t] for t in tokens]


# --- transform ---------------------------------------------------------------------------
def test_pair_exact_ids_segments_padding(tok):
    t = BERTDatasetTransform(tok, max_len=10, class_labels=["0", "1"])
    words, valid_length, segments, label = t(("Hello world", "good morning", "1"))
    expected = ids("[CLS]", "hello", "world", "[SEP]", "good", "morning", "[SEP]")
    assert expected[0] == 101 and expected[3] == 102        # the uncased vocabulary's ids
    assert words.tolist() == expected + [0, 0, 0]           # [PAD] = 0
    assert int(valid_length) == 7
    assert segments.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert int(label) == 1 and label.dtype == np.int32
    assert t.num_truncated == 0


def test_truncation_trims_longer_sentence_first(tok):
    t = BERTDatasetTransform(tok, max_len=8, class_labels=["0", "1"], pad=False)
    words, valid_length, segments, _ = t(("one two three four five", "six seven", "0"))
    # budget 8 - 3 = 5 tokens: A loses 'five' then 'four' (longer first)
    assert words.tolist() == ids("[CLS]", "one", "two", "three", "[SEP]", "six", "seven", "[SEP]")
    assert int(valid_length) == 8
    assert segments.tolist() == [0] * 5 + [1] * 3
    # tie: B is trimmed (BERT's _truncate_seq_pair); both end at 2 tokens
    words, _, _, _ = t(("one two three", "four five six", "0"))
    assert words.tolist() == ids("[CLS]", "one", "two", "three", "[SEP]", "four", "five", "[SEP]")
    words, _, _, _ = t(("one two three four", "five six seven eight", "0"))
    assert words.tolist() == ids("[CLS]", "one", "two", "three", "[SEP]", "five", "six", "[SEP]")
    assert t.num_truncated == 3


def test_no_label_single_sentence_and_regression(tok):
    t = BERTDatasetTransform(tok, max_len=6, has_label=False, pad=False, pair=False)
    out = t(("Good movie",))
    assert len(out) == 3
    assert out[0].tolist() == ids("[CLS]", "good", "movie", "[SEP]")
    assert out[2].tolist() == [0, 0, 0, 0] and int(out[1]) == 4
    r = BERTDatasetTransform(tok, max_len=6, class_labels=None, pair=False)
    words, vl, seg, label = r(("good", "3.25"))
    assert label.dtype == np.float32 and float(label) == 3.25
    assert words.tolist() == ids("[CLS]", "good", "[SEP]") + [0, 0, 0]
    with pytest.raises(ValueError, match="not one of"):
        BERTDatasetTransform(tok, 6, ["neg", "pos"], pair=False)(("good", "meh"))


def test_dataloader_buckets_and_dynamic_padding(tok):
    t = BERTDatasetTransform(tok, max_len=32, class_labels=["0", "1"], pad=False, pair=False)
    texts = ["a " * n for n in (1, 2, 3, 5, 8, 13, 21, 25)]
    samples = [t((s, str(i % 2))) for i, s in enumerate(texts)]
    loader = data.make_dataloader(samples, batch_size=3, pad_id=tok.pad_id, shuffle=False,
                                  num_buckets=3)
    seen = data.sampler_order(loader)
    assert sorted(seen) == list(range(len(samples)))
    order = iter(seen)
    for words, vl, seg, label in loader:
        vl = vl.asnumpy().astype(int)
        assert words.shape[1] == vl.max()              # padded to the longest in the batch
        for row, n in zip(words.asnumpy(), vl):
            i = next(order)
            assert row[:n].tolist() == samples[i][0].tolist()
            assert (row[n:] == tok.pad_id).all()
        assert label.dtype == np.int32


# --- reading GLUE files -----------------------------------------------------------------
@need_mrpc
def test_mrpc_splits():
    train = data.load_task("mrpc", "train", data_dir=MRPC)
    dev = data.load_task("mrpc", "dev", data_dir=MRPC)
    test = data.load_task("mrpc", "test", data_dir=MRPC)
    assert (len(train), len(dev), len(test)) == (3668, 408, 1725)
    assert dev[0] == ("He said the foodservice pie business doesn 't fit the company 's "
                      "long-term growth strategy .", '" The foodservice pie business does not '
                      "fit our long-term growth strategy .", "1")
    assert sum(r[2] == "1" for r in train) == 2474 and sum(r[2] == "1" for r in dev) == 279
    assert len(test[0]) == 2


@need_sst2
def test_sst2_dev():
    dev = data.load_task("sst-2", "dev", data_dir=SST2)
    assert len(dev) == 872 and sum(r[1] == "1" for r in dev) == 444
    assert dev[0] == ("it 's a charming and often affecting journey .", "1")  # trailing space gone


def test_task_dir_env_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MRPC_DIR", str(tmp_path))
    assert data.task_dir("mrpc") == str(tmp_path)
    monkeypatch.setenv("MRPC_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MRPC_DIR"):
        data.task_dir("mrpc")
    with pytest.raises(ValueError, match="unknown task"):
        data.task_dir("qnli")


# --- bad input --------------------------------------------------------------------------
def _write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


GOOD = b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b .\tC d .\n"


@pytest.mark.parametrize("row, message", [
    (b"1\t3\t4\tonly four fields\n", r"bad\.tsv:3: expected 5 fields, found 4"),
    (b"0\t3\t4\t \tC d .\n", r"bad\.tsv:3: empty text in column '#1 String'"),
    (b"2\t3\t4\tA\tB\n", r"bad\.tsv:3: label '2' is not one of \['0', '1'\]"),
    (b"1\t3\t4\tcaf\xe9\tB\n", r"bad\.tsv:3: not valid UTF-8"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, "bad.tsv", GOOD + row + b"0\t5\t6\tE f .\tG h .\n")
    cols = ("#1 String", "#2 String")
    with pytest.raises(DataError, match=message):
        read_examples(path, cols, "Quality", ["0", "1"])
    stats = data.ReadStats(path)
    rows = read_examples(path, cols, "Quality", ["0", "1"], skip_bad=True, stats=stats)
    assert rows == [("A b .", "C d .", "1"), ("E f .", "G h .", "0")]   # never misaligned
    assert stats.skipped == 1 and stats.rows == 2 and "bad.tsv:3" in stats.errors[0]


def test_regression_label_must_be_number(tmp_path):
    path = _write(tmp_path, "r.tsv", b"s\ty\ngood\t0.5\nbad\tlots\n")
    with pytest.raises(DataError, match=r"r\.tsv:3: label 'lots' is not a number"):
        read_examples(path, ["s"], "y")
    assert read_examples(path, ["s"], "y", skip_bad=True) == [("good", "0.5")]


def test_csv_by_column_options(tmp_path):
    path = _write(tmp_path, "x.csv", b'id,label,text\n7,pos,"Great, really great"\n'
                                     b'8,neg,"Bad ""quoted"" film"\n')
    rows = read_examples(path, ["text"], "label", ["neg", "pos"])
    assert rows == [("Great, really great", "pos"), ('Bad "quoted" film', "neg")]
    rows = read_examples(path, [2], 1, ["neg", "pos"])          # by index
    assert rows[1] == ('Bad "quoted" film', "neg")
    with pytest.raises(DataError, match=r"x\.csv:1: no column 'sentence'"):
        read_examples(path, ["sentence"], "label", ["neg", "pos"])
    noheader = _write(tmp_path, "n.tsv", b"a b\t1\nc d\t0\n")
    assert read_examples(noheader, [0], 1, ["0", "1"], header=False) == [("a b", "1"), ("c d", "0")]


# --- download ---------------------------------------------------------------------------
@pytest.fixture()
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def test_download_checks_checksum(http_root, tmp_path):
    www, url = http_root
    (www / "f.txt").write_bytes(b"hello\n")
    good = hashlib.sha1(b"hello\n").hexdigest()
    dest = str(tmp_path / "dl" / "f.txt")
    assert data.download(url + "f.txt", dest, sha1=good) == dest
    assert open(dest, "rb").read() == b"hello\n"
    bad = str(tmp_path / "dl" / "g.txt")
    with pytest.raises(OSError, match="sha1 checksum mismatch"):
        data.download(url + "f.txt", bad, sha1="0" * 40)
    assert not os.path.exists(bad) and os.listdir(tmp_path / "dl") == ["f.txt"]  # no leftovers
    with pytest.raises(OSError):
        data.download(url + "missing.txt", str(tmp_path / "dl" / "m.txt"))


@need_mrpc
def test_download_mrpc_rebuilds_glue_files(http_root, tmp_path):
    """Serve the raw MSR file and GLUE's dev ids locally; the split must reproduce GLUE's
    train.tsv / dev.tsv / test.tsv byte for byte (GluonNLP's published sha1s)."""
    www, url = http_root
    shutil.copy(os.path.join(MRPC, "msr_paraphrase_train.txt"), www)
    shutil.copy(os.path.join(MRPC, "dev_ids.tsv"), www)
    # the raw test file is not in the shared folder: rebuild it from GLUE's test.tsv
    with open(os.path.join(MRPC, "test.tsv"), encoding="utf-8") as f:
        rows = f.read().splitlines()[1:]
    with open(www / "msr_paraphrase_test.txt", "w", encoding="utf-8") as f:
        f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for r in rows:
            f.write("1\t" + r.split("\t", 1)[1] + "\n")
    sources = {name: (url + name, real[1] if name != "msr_paraphrase_test.txt"
                      else _sha1(www / name))
               for name, real in data.SOURCES["mrpc"].items()}
    root = str(tmp_path / "cache" / "mrpc")
    assert data.download_task("mrpc", root, sources=sources) == root
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        assert _sha1(os.path.join(root, name)) == data.BUILT_SHA1["mrpc"][name]
    # through task_dir: the cache is found, nothing is fetched again
    assert len(data.read_examples(os.path.join(root, "dev.tsv"), ("#1 String", "#2 String"),
                                  "Quality", ["0", "1"])) == 408


def test_offline_message(monkeypatch, tmp_path):
    monkeypatch.delenv("SST2_DIR", raising=False)
    monkeypatch.setenv("BERT_GLUON_HOME", str(tmp_path))
    monkeypatch.setattr(data, "REPO_ROOT", str(tmp_path / "repo"))   # no ../shared/data
    with pytest.raises(FileNotFoundError, match=r"Put train\.tsv, dev\.tsv, test\.tsv"):
        data.task_dir("sst-2", download_missing=False)

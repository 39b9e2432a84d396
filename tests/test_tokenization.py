"""WordPiece tokenization: ids are vocab.txt line numbers (the checkpoint's embedding rows),
equal to Hugging Face's BertTokenizer on every MRPC dev sentence."""
import os

import pytest

from bert_gluon.checkpoints import minilm_dir
from bert_gluon.tokenization import Tokenizer, load_vocab
from conftest import data_dir


@pytest.fixture(scope="module")
def vocab_path():
    return os.path.join(minilm_dir(), "vocab.txt")


@pytest.fixture(scope="module")
def tok(vocab_path):
    return Tokenizer.from_file(vocab_path)


def test_special_ids_are_line_numbers(tok, vocab_path):
    # bert-base-uncased / MiniLM vocab.txt: [PAD] line 1, [UNK] 101, [CLS] 102, [SEP] 103, [MASK] 104
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    with open(vocab_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    assert len(tok) == len(lines) == 30522
    for i in (0, 1, 999, 1996, 2088, 7592, 30521):
        assert tok.convert_tokens_to_ids([lines[i]]) == [i]
        assert tok.convert_ids_to_tokens([i]) == [lines[i]]


def test_hand_computed_examples(tok):
    # ids = (line number in vocab.txt) - 1, read with `grep -nx hello vocab.txt` → 7593
    assert tok.tokenize("Hello World!") == ["hello", "world", "!"]
    assert tok.encode("Hello World!") == [7592, 2088, 999]
    assert tok.encode("Café naïve") == [7668, 15743]              # lower-cased, accents stripped
    assert tok.encode("中文 test") == [1746, 1861, 3231]           # CJK: one token per character
    assert tok.encode("\u2603") == [tok.unk_id]                  # not in the vocabulary


def test_save_round_trip(tok, tmp_path):
    path = tok.save(str(tmp_path))
    again = Tokenizer.from_file(path)
    assert again.vocab.idx_to_token == tok.vocab.idx_to_token
    assert again.encode("The quick brown fox.") == tok.encode("The quick brown fox.")


@pytest.mark.parametrize("content, message", [
    ("", "vocabulary file is empty"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nfoo\nfoo\n", r":7: duplicate token 'foo' \(first on line 6\)"),
    ("[PAD]\n[UNK]\n[CLS]\nfoo\n", r"lacks the special tokens \['\[SEP\]', '\[MASK\]'\]"),
])
def test_bad_vocab_files(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_vocab(str(path))


def test_invalid_utf8_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_vocab(str(path))


def test_matches_hf_bert_tokenizer_on_all_mrpc_dev_sentences(tok, vocab_path):
    pytest.importorskip("transformers", reason="the reference is HF transformers' BertTokenizer")
    from transformers import BertTokenizer

    from bert_gluon.data import load_task

    mrpc = data_dir("MRPC_DIR", "mrpc")
    if not os.path.exists(os.path.join(mrpc, "dev.tsv")):
        pytest.skip(f"MRPC dev set not found in {mrpc} (set MRPC_DIR)")
    sentences = [s for ex in load_task("mrpc", "dev", data_dir=mrpc) for s in ex[:2]]
    assert len(sentences) == 816
    import inspect
    # transformers >= 5 takes the vocabulary as `vocab=`, older versions as `vocab_file=`
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizer.__init__).parameters else "vocab_file"
    hf = BertTokenizer(**{arg: vocab_path}, do_lower_case=True)
    assert len(hf) == len(tok) and hf.convert_tokens_to_ids("[MASK]") == tok.mask_id
    mismatches = [(s, tok.encode(s), hf.encode(s, add_special_tokens=False))
                  for s in sentences]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    print(f"\ntokenizer vs HF BertTokenizer: {len(sentences) - len(mismatches)}/{len(sentences)} "
          f"MRPC dev sentences with identical ids")
    assert not mismatches, mismatches[:3]

"""Pre-training data: readers, bad input, next-sentence pairs, masking statistics, shards.

References are hand-made corpora whose token ids encode where each token came from, so a
"next" pair can be checked to be really consecutive, and the real Gutenberg books for the
header/footer stripping (the last sentences are quoted in ../shared/data/gutenberg/SOURCE.md).
"""
import os
import random

import numpy as np
import pytest

from conftest import data_dir

from bert_gluon import pretraining_data as pdm
from bert_gluon.tokenization import Tokenizer

GUTENBERG = data_dir("GUTENBERG_DIR", "gutenberg")
CLS, SEP, PAD, MASK, UNK = 2, 3, 0, 4, 1


# --- helpers ----------------------------------------------------------------------------
@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A vocabulary with the special tokens, lower-case words w0..w499, '.' and pieces."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "\""]
    words += [f"w{i}" for i in range(500)] + ["un", "##believ", "##able", "hello", "world"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return Tokenizer.from_file(str(path))


def masking_config(vocab_size=1000, **kw):
    return pdm.MaskingConfig(vocab_size=vocab_size, mask_id=MASK,
                             special_ids=(PAD, UNK, CLS, SEP, MASK), **kw)


def numbered_docs(num_docs=20, sentences=(3, 12), length=(4, 25), seed=0):
    """Documents of unique, consecutive ids: doc d, token k -> 10_000 * (d + 1) + k."""
    rng = random.Random(seed)
    docs = []
    for d in range(num_docs):
        k, doc = 0, []
        for _ in range(rng.randint(*sentences)):
            n = rng.randint(*length)
            doc.append(list(range(10_000 * (d + 1) + k, 10_000 * (d + 1) + k + n)))
            k += n
        docs.append(doc)
    return docs


# --- sentence splitting and readers -----------------------------------------------------
def test_split_sentences_hand_examples():
    assert pdm.split_sentences("It rained. We stayed in! Did you? Yes.") == \
        ["It rained.", "We stayed in!", "Did you?", "Yes."]
    # abbreviations and initials do not end a sentence; lower case after '.' does not either
    assert pdm.split_sentences("Mr. Holmes met Dr. Watson. H. G. Wells wrote e.g. this.") == \
        ["Mr. Holmes met Dr. Watson.", "H. G. Wells wrote e.g. this."]
    assert pdm.split_sentences('"Stop!" he cried. "Now."') == ['"Stop!" he cried.', '"Now."']
    assert pdm.split_sentences("   ") == []


def test_read_wikitext_documents_and_headings(tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_text(" \n = Lobster = \n \n Lobsters are big . They live in the sea . \n"
                    " \n = = Biology = = \n \n The claws are 60 @,@ 000 @-@ strong . \n"
                    " \n = Empty = \n \n = Crab = \n \n Crabs walk . \n", encoding="utf-8")
    stats = pdm.CorpusStats()
    docs = pdm.read_corpus([str(path)], "wikitext", stats)
    assert docs == [["Lobsters are big .", "They live in the sea .",
                     "The claws are 60,000-strong ."], ["Crabs walk ."]]
    assert stats.empty_documents == 1 and stats.files == 1
    assert pdm.detect_layout(str(path)) == "wikitext"


def test_wikitext_unk_becomes_the_unknown_token(tmp_path, tiny_tokenizer):
    docs = pdm.tokenize_documents([["w1 <unk> w2 .", "<unk>"]], tiny_tokenizer)
    w1, w2, dot = tiny_tokenizer.encode("w1 w2 .")
    assert docs == [[[w1, tiny_tokenizer.unk_id, w2, dot], [tiny_tokenizer.unk_id]]]


def test_read_sentence_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First doc one.\nFirst doc two.\n\n\n\nSecond doc.\n", encoding="utf-8")
    assert pdm.read_corpus([str(path)], "auto") == [["First doc one.", "First doc two."],
                                                    ["Second doc."]]


def test_gutenberg_stripping_synthetic(tmp_path):
    body = ("Produced by Someone Kind\n\n\nCHAPTER I\n\nIt was a dark\nnight. The end came.\n\n"
            "End of the Project Gutenberg EBook of X\n")
    for start, end, newline, bom in [
            ("*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "*** END OF THIS PROJECT "
             "GUTENBERG EBOOK X ***", "\n", True),
            ("***START OF THE PROJECT GUTENBERG EBOOK X***", "***END OF THE PROJECT GUTENBERG "
             "EBOOK X***", "\r\n", False),
            ("*** START OF THE PROJECT GUTENBERG EBOOK THE ADVENTURES OF\nSHERLOCK ***",
             "*** END OF THE PROJECT GUTENBERG EBOOK THE\nADVENTURES ***", "\n", True)]:
        text = ("The Project Gutenberg eBook of X\nlicence words.\n" + start + "\n" + body + end
                + "\nMore licence. Project Gutenberg is a trademark.\n")
        data = ("\ufeff" if bom else "") + text.replace("\n", newline)
        path = tmp_path / "book.txt"
        path.write_bytes(data.encode("utf-8"))
        assert pdm.detect_layout(str(path)) == "gutenberg"
        assert pdm.read_corpus([str(path)]) == [["CHAPTER I", "It was a dark night.",
                                                 "The end came."]]


@pytest.mark.parametrize("book, last_words", [
    ("moby-dick.txt", "only found another orphan."),               # BOM + blank lines
    ("tale-of-two-cities.txt", "than I have ever known.\u201d"),
    ("tom-sawyer.txt", "they turned out to be; therefore it will be wisest not to reveal any "
                       "of that part of their lives at present."),  # CRLF, no BOM
    ("sherlock-holmes.txt", "considerable success."),               # markers wrap a line
    ("wuthering-heights.txt", "for the sleepers in that quiet earth."),  # ***START...***
])
def test_gutenberg_books_lose_header_and_footer(book, last_words):
    path = os.path.join(GUTENBERG, book)
    if not os.path.exists(path):
        pytest.skip(f"Gutenberg book not found: {path} (set GUTENBERG_DIR)")
    stats = pdm.CorpusStats()
    (doc,) = pdm.read_corpus([path], "auto", stats)
    text = " ".join(doc)
    for licence_words in ("project gutenberg license", "gutenberg ebook", "gutenberg.org",
                          "end of project gutenberg", "end of the project gutenberg",
                          "*** start of", "*** end of"):
        assert licence_words not in text.lower()
    assert "\ufeff" not in text and "\r" not in text
    assert doc[-1].endswith(last_words)
    assert stats.files_without_gutenberg_markers == 0 and stats.undecodable_lines == 0


# --- bad input ---------------------------------------------------------------------------
def test_bad_input_is_skipped_and_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.txt"
    long_line = " ".join(f"w{i % 500}" for i in range(300)) + "."
    path.write_bytes(b"w1 w2 w3.\nw4 w5 w6.\n\n\n"              # a normal document
                     b"\xff\xfe broken bytes\n\n"               # non-UTF-8 -> skipped line
                     b"w7 w8 w9.\n\n"                           # a one-sentence document
                     b"zzzz qqqq.\n\n"                          # tokenizes to [UNK] only: kept
                     + long_line.encode() + b"\nw10 w11.\n\n"   # longer than max_seq_length
                     b"\xc3\n")                                 # truncated UTF-8 at the end
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match=r"bad\.txt:5: skipping a line that is not valid UTF-8"):
        meta = pdm.create_pretraining_data([str(path)], str(out), tiny_tokenizer,
                                           max_seq_length=32, progress=False)
    s = meta["stats"]
    assert s["undecodable_lines"] == 2
    assert s["long_sentences"] >= 1
    assert s["one_sentence_documents"] >= 2
    arrays, _ = pdm.load_shards(str(out))
    assert arrays["valid_length"].max() <= 32
    assert len(arrays["valid_length"]) == s["instances"] > 0


def test_non_utf8_strict_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Fine line.\n\nCaf\u00e9 au lait.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: line is not valid UTF-8"):
        pdm.read_corpus([str(path)], "lines", errors="strict")


def test_empty_corpus_is_a_clear_error(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus.*empty.txt"):
        pdm.create_pretraining_data([str(empty)], str(tmp_path / "o"), tiny_tokenizer,
                                    progress=False)
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        pdm.create_pretraining_data([str(tmp_path / "no-such-file")], str(tmp_path / "o"),
                                    tiny_tokenizer, progress=False)


# --- next-sentence pairs ----------------------------------------------------------------
def _doc_of(token: int) -> int:
    return token // 10_000 - 1


def test_nsp_pairs_are_balanced_and_correct():
    docs = numbered_docs(num_docs=40, seed=1)
    rng = random.Random(0)
    stats = pdm.CorpusStats()
    instances = []
    for _ in range(10):
        for d in range(len(docs)):
            instances += pdm.create_pair_instances(docs, d, 64, 0.1, rng, CLS, SEP, stats)
    assert len(instances) > 1000
    labels = np.array([not r for _, _, r in instances])
    assert 0.45 <= labels.mean() <= 0.55
    short = 0
    for tokens, len_a, is_random in instances:
        assert len(tokens) <= 64
        assert tokens[0] == CLS and tokens[len_a + 1] == SEP and tokens[-1] == SEP
        a, b = tokens[1:len_a + 1], tokens[len_a + 2:-1]
        assert a and b and CLS not in a + b and SEP not in a + b
        # A is always a contiguous piece of one document
        assert all(_doc_of(t) == _doc_of(a[0]) for t in a) and np.all(np.diff(a) == 1)
        if is_random:
            assert all(_doc_of(t) != _doc_of(a[0]) for t in b)
            assert all(_doc_of(t) == _doc_of(b[0]) for t in b)
        else:   # the actual next text: A then B without a gap in the same document
            assert np.all(np.diff(a + b) == 1)
        short += len(tokens) < 40
    assert short > 0   # short_seq_prob makes some short sequences
    packed = pdm.pack_instances(instances[:3], 64, PAD)
    tokens, len_a, _ = instances[0]
    assert packed["segment_ids"][0, :len_a + 2].sum() == 0
    assert packed["segment_ids"][0, len_a + 2:len(tokens)].min() == 1
    assert packed["segment_ids"][0, len(tokens):].sum() == 0
    assert (packed["input_ids"][0, len(tokens):] == PAD).all()


def test_one_sentence_document_is_cut_inside_the_sentence():
    docs = numbered_docs(num_docs=5, seed=2)
    docs[0] = [list(range(10_000, 10_010))]
    kinds = set()
    for seed in range(40):
        inst = pdm.create_pair_instances(docs, 0, 64, 0.0, random.Random(seed), CLS, SEP)
        assert len(inst) == 1
        tokens, len_a, is_random = inst[0]
        a, b = tokens[1:len_a + 1], tokens[len_a + 2:-1]
        assert a == list(range(10_000, 10_000 + len(a)))
        if not is_random:
            assert a + b == list(range(10_000, 10_010))
        kinds.add(is_random)
    assert kinds == {True, False}
    docs[0] = [[10_000]]    # a one-token document can only have a random next
    for seed in range(10):
        inst = pdm.create_pair_instances(docs, 0, 64, 0.0, random.Random(seed), CLS, SEP)
        assert [r for _, _, r in inst] == [True]


# --- masking ------------------------------------------------------------------------------
def test_masking_statistics_large_sample():
    cfg = masking_config(masked_lm_prob=0.15, max_predictions_per_seq=128)
    rng = np.random.default_rng(0)
    eligible = masked = as_mask = unchanged = random_tok = 0
    for _ in range(3000):
        n_a, n_b = rng.integers(5, 60, size=2)
        body = rng.integers(10, 1000, size=n_a + n_b)
        tokens = np.concatenate([[CLS], body[:n_a], [SEP], body[n_a:], [SEP],
                                 np.full(rng.integers(0, 10), PAD)])
        out, pos, lab = pdm.mask_instance(tokens, cfg, rng)
        assert not np.isin(tokens[pos], cfg.special_ids).any()       # never CLS/SEP/PAD
        assert np.array_equal(lab, tokens[pos])
        untouched = np.setdiff1d(np.arange(len(tokens)), pos)
        assert np.array_equal(out[untouched], tokens[untouched])
        assert not np.isin(out[pos], [PAD, CLS, SEP, UNK]).any()
        eligible += n_a + n_b
        masked += len(pos)
        as_mask += np.sum(out[pos] == MASK)
        unchanged += np.sum(out[pos] == tokens[pos])
        random_tok += np.sum((out[pos] != MASK) & (out[pos] != tokens[pos]))
    assert abs(masked / eligible - 0.15) < 0.01
    assert abs(as_mask / masked - 0.8) < 0.02
    assert abs(unchanged / masked - 0.1) < 0.02
    assert abs(random_tok / masked - 0.1) < 0.02


def test_max_predictions_per_seq_caps_masking():
    cfg = masking_config(max_predictions_per_seq=5)
    rng = np.random.default_rng(1)
    tokens = np.concatenate([[CLS], rng.integers(10, 1000, 120), [SEP]])
    for _ in range(50):
        _, pos, _ = pdm.mask_instance(tokens, cfg, rng)
        assert len(pos) == 5


def test_whole_word_masking_masks_every_piece(tiny_tokenizer):
    cfg = pdm.MaskingConfig.from_tokenizer(tiny_tokenizer, whole_word=True,
                                           max_predictions_per_seq=40)
    word = tiny_tokenizer.encode("unbelievable")
    assert len(word) == 3   # un ##believ ##able
    rng = np.random.default_rng(0)
    seen_word_masked = 0
    for _ in range(300):
        body = []
        for _ in range(30):
            body += word if rng.random() < 0.3 else tiny_tokenizer.encode(f"w{rng.integers(500)}")
        tokens = np.array([tiny_tokenizer.cls_id] + body + [tiny_tokenizer.sep_id])
        _, pos, _ = pdm.mask_instance(tokens, cfg, rng)
        chosen = set(pos.tolist())
        for start in range(len(tokens) - 2):
            if list(tokens[start:start + 3]) == word:
                hit = [p in chosen for p in range(start, start + 3)]
                assert all(hit) or not any(hit), (tokens, pos)
                seen_word_masked += all(hit)
    assert seen_word_masked > 50


# --- static shards, dynamic masking, batches --------------------------------------------
def _write_corpus(tmp_path, num_docs=12):
    rng = random.Random(0)
    lines = []
    for _ in range(num_docs):
        for _ in range(rng.randint(3, 10)):
            lines.append(" ".join(f"w{rng.randint(0, 499)}" for _ in range(rng.randint(3, 15)))
                         + " .")
        lines.append("")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def test_shards_do_not_depend_on_worker_count(tmp_path, tiny_tokenizer):
    corpus = _write_corpus(tmp_path)
    metas = [pdm.create_pretraining_data([corpus], str(tmp_path / f"w{w}"), tiny_tokenizer,
                                         max_seq_length=48, num_shards=2, num_workers=w,
                                         dupe_factor=3, progress=False) for w in (1, 2)]
    a, _ = pdm.load_shards(str(tmp_path / "w1"))
    b, _ = pdm.load_shards(str(tmp_path / "w2"))
    assert metas[0]["stats"] == metas[1]["stats"]
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # dupe_factor=3: three passes with different masks over the same text
    assert metas[0]["stats"]["instances"] == len(a["valid_length"])
    assert len(metas[0]["shards"]) == 2


def test_dynamic_masking_changes_every_epoch_and_is_repeatable(tmp_path, tiny_tokenizer):
    corpus = _write_corpus(tmp_path)
    pdm.create_pretraining_data([corpus], str(tmp_path / "d"), tiny_tokenizer,
                                max_seq_length=48, progress=False)
    static = pdm.PretrainingData.from_shards(str(tmp_path / "d"), tiny_tokenizer)
    dynamic = pdm.PretrainingData.from_shards(str(tmp_path / "d"), tiny_tokenizer, dynamic=True,
                                              seed=3)
    original = pdm.unmask(static.arrays)["input_ids"]
    assert np.array_equal(dynamic.arrays["input_ids"], original)
    e0, e0_again, e1 = dynamic.epoch_arrays(0), dynamic.epoch_arrays(0), dynamic.epoch_arrays(1)
    assert np.array_equal(e0["masked_positions"], e0_again["masked_positions"])
    assert not np.array_equal(e0["masked_positions"], e1["masked_positions"])
    assert np.array_equal(pdm.unmask(e1)["input_ids"], original)
    assert static.epoch_arrays(0) is static.epoch_arrays(5)


def test_batches_resume_and_split_between_workers():
    n = 103
    arrays = {k: np.arange(n * 2).reshape(n, 2) for k in pdm.BATCH_KEYS}
    arrays["valid_length"] = np.arange(n)
    full = [b["valid_length"] for _, b in pdm.iterate_batches(arrays, 8, seed=1, epoch=2)]
    rest = [b["valid_length"] for _, b in pdm.iterate_batches(arrays, 8, seed=1, epoch=2,
                                                              start_batch=5)]
    assert len(full) == 12 and all(np.array_equal(x, y) for x, y in zip(full[5:], rest))
    other_epoch = [b["valid_length"] for _, b in pdm.iterate_batches(arrays, 8, seed=1, epoch=3)]
    assert not np.array_equal(full[0], other_epoch[0])
    parts = [np.concatenate([b["valid_length"] for _, b in
                             pdm.iterate_batches(arrays, 8, seed=1, part_index=r, num_parts=2)])
             for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 48 and not set(parts[0]) & set(parts[1])
    every = np.concatenate([b["valid_length"] for _, b in
                            pdm.iterate_batches(arrays, 8, shuffle=False, drop_last=False)])
    assert np.array_equal(every, np.arange(n))

"""WordPiece tokenization with the checkpoint's own token ids.

We use GluonNLP's ``BERTTokenizer`` (basic tokenization + greedy WordPiece) and
``BERTVocab``, but build the vocabulary so that **every token keeps its line number in
``vocab.txt`` as its id**. GluonNLP's default ``BERTVocab`` re-indexes the special tokens
(``[PAD]``=1, ``[CLS]``=2, ...), which does not match the rows of a Hugging Face or
google-research embedding matrix (``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101,
``[SEP]``=102, ``[MASK]``=103 in the uncased vocabulary).
"""
from __future__ import annotations

import collections
import os
from typing import Iterable, List, Sequence, Union

import gluonnlp as nlp

from .fileio import atomic_path

__all__ = ["load_vocab", "Tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_vocab(path: str) -> nlp.vocab.BERTVocab:
    """Read a one-token-per-line ``vocab.txt`` into a ``BERTVocab`` whose ids are line numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: vocabulary is not valid UTF-8 ({e})") from None
    while tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        raise ValueError(f"{path}: vocabulary file is empty")
    index = {}
    for lineno, tok in enumerate(tokens, start=1):
        if tok in index:
            raise ValueError(f"{path}:{lineno}: duplicate token {tok!r} "
                             f"(first on line {index[tok] + 1})")
        index[tok] = lineno - 1
    missing = [t for t in SPECIAL_TOKENS if t not in index]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")
    return nlp.vocab.BERTVocab(collections.Counter(tokens), token_to_idx=index, min_freq=1)


class Tokenizer:
    """Text → WordPiece tokens → ids, with the vocabulary's special-token ids at hand.

    >>> tok = Tokenizer.from_file("vocab.txt")               # doctest: +SKIP
    >>> tok.encode("Hello world!")                           # doctest: +SKIP
    [7592, 2088, 999]
    """

    def __init__(self, vocab: nlp.vocab.BERTVocab, lower: bool = True):
        self.vocab = vocab
        self.lower = lower
        self._tokenizer = nlp.data.BERTTokenizer(vocab, lower=lower)
        self.pad_id = vocab[vocab.padding_token]
        self.unk_id = vocab[vocab.unknown_token]
        self.cls_id = vocab[vocab.cls_token]
        self.sep_id = vocab[vocab.sep_token]
        self.mask_id = vocab[vocab.mask_token]

    @classmethod
    def from_file(cls, vocab_path: str, lower: bool = True) -> "Tokenizer":
        return cls(load_vocab(vocab_path), lower=lower)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str) -> List[str]:
        return self.tokenize(text)

    def tokenize(self, text: str) -> List[str]:
        """WordPiece tokens of ``text`` (lower-cased and accent-stripped when ``lower``)."""
        return self._tokenizer(text)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        return self.vocab.to_indices(list(tokens))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        return self.vocab.to_tokens([int(i) for i in ids])

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without ``[CLS]``/``[SEP]``."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def save(self, directory: str) -> str:
        """Write ``vocab.txt`` (ids = line numbers) into ``directory``; returns its path."""
        path = os.path.join(directory, "vocab.txt")
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for tok in self.vocab.idx_to_token:
                    f.write(tok + "\n")
        return path


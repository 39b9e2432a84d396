"""Pre-training data: raw text → documents → sentence pairs → masked instances → batches.

    text files ─► read_corpus ─► documents (lists of sentences)        WikiText / one sentence per
                                                                       line / Project Gutenberg books
               ─► tokenize_documents ─► documents of WordPiece ids
               ─► create_pair_instances ─► [CLS] A [SEP] B [SEP]       next-sentence pairs, packed to
                                                                       max_seq_length (short_seq_prob)
               ─► mask_instance ─► 15% of tokens: 80% [MASK] / 10% random / 10% unchanged
               ─► static: shards written once by worker processes  (create_pretraining_data)
                  dynamic: re-masked every epoch                     (PretrainingData(dynamic=True))
               ─► iterate_batches ─► shuffled mini-batches with a resumable position

The pair and masking logic follows google-research/bert's ``create_pretraining_data.py``,
with one deliberate difference: when a pair is too long we cut sentence A at its *front* and
sentence B at its *back*, so that for a "next" pair the end of A really is followed by the
start of B in the document.

Bad input never crashes the pipeline: empty documents are skipped, a one-sentence document
is cut inside its sentence to make pairs, sentences longer than a sequence are split, undecodable
lines are skipped (or, with ``errors="strict"``, reported with file and line); every such
case is counted in :class:`CorpusStats`. An empty corpus is an error naming the files.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing as mp
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .fileio import atomic_path, write_json

__all__ = ["CorpusStats", "split_sentences", "read_wikitext", "read_sentence_per_line",
           "read_gutenberg", "read_corpus", "tokenize_documents", "create_pair_instances",
           "mask_instance", "MaskingConfig", "pack_instances", "mask_packed", "unmask",
           "create_pretraining_data", "load_shards", "PretrainingData", "iterate_batches"]

Document = List[str]              # a document: its sentences, as text
IdDocument = List[List[int]]      # a document: its sentences, as WordPiece ids


# --- bookkeeping -------------------------------------------------------------------------
@dataclass
class CorpusStats:
    """What the pipeline read, made and skipped (every bad-input case is counted here)."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    tokens: int = 0
    empty_documents: int = 0           # skipped: no sentence left after cleaning/tokenizing
    one_sentence_documents: int = 0    # kept: the sentence is cut in two for its pairs
    undecodable_lines: int = 0         # skipped: not valid UTF-8
    long_sentences: int = 0            # split: longer than max_seq_length - 3 tokens
    files_without_gutenberg_markers: int = 0
    instances: int = 0
    random_next: int = 0

    def merge(self, other: "CorpusStats") -> "CorpusStats":
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


# --- sentence splitting ------------------------------------------------------------------
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "no", "vs", "etc", "capt", "col",
    "gen", "lt", "sgt", "rev", "messrs", "mme", "mlle", "hon", "gov", "i.e", "e.g", "viz", "cf",
    "vol", "ch", "chap", "fig", "p", "pp", "ft", "co",
}
# end punctuation, optional closing quotes/brackets/underscores, then space and a capital,
# digit or opening quote
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]_]*(?=\s+[\"'“‘(\[_]*[A-Z0-9])")


def split_sentences(text: str) -> List[str]:
    """Split a paragraph into sentences at ``.``/``!``/``?`` followed by a capital letter.

    Common abbreviations (``Mr.``, ``Dr.``, ``e.g.``) and initials (``H. G. Wells``) do not
    end a sentence.

    >>> split_sentences('Mr. Holmes sat down. "Well?" he said. H. G. Wells wrote it! Yes.')
    ['Mr. Holmes sat down.', '"Well?" he said.', 'H. G. Wells wrote it!', 'Yes.']
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if text[m.start()] == ".":
            words = text[start:m.start()].rsplit(None, 1)
            word = words[-1].strip("\"'“‘(_").lower() if words else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


# --- corpus readers ----------------------------------------------------------------------
def _read_lines(path: str, stats: CorpusStats, errors: str = "skip") -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` for each line: BOM removed, CRLF/LF normalised, and lines that
    are not valid UTF-8 skipped and counted (``errors="skip"``) or reported
    (``errors="strict"``: ``ValueError`` naming file and line)."""
    if errors not in ("skip", "strict"):
        raise ValueError(f"errors must be 'skip' or 'strict', got {errors!r}")
    stats.files += 1
    warned = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if errors == "strict":
                    raise ValueError(f"{path}:{lineno}: line is not valid UTF-8 (byte {e.start}: "
                                     f"{raw[e.start:e.start + 1]!r}); fix the file or read it "
                                     f"with errors='skip'") from None
                stats.undecodable_lines += 1
                if not warned:
                    warnings.warn(f"{path}:{lineno}: skipping a line that is not valid UTF-8 "
                                  f"(further ones in this file are only counted)")
                    warned = True
                continue
            yield lineno, line.rstrip("\r\n")


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")
_WIKI_HEADING = re.compile(r"^ (= )+.*( =)+ $")


def _unescape_wikitext(line: str) -> str:
    return line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")


def read_wikitext(path: str, stats: Optional[CorpusStats] = None,
                  errors: str = "skip") -> Iterator[Document]:
    """Documents of a WikiText file: a `` = Title = `` line opens a document; section
    headings (`` = = Section = = ``) are dropped; each paragraph line is split into sentences."""
    stats = stats if stats is not None else CorpusStats()
    doc: Document = []
    opened = False
    for _, line in _read_lines(path, stats, errors):
        if _WIKI_TITLE.match(line):
            if opened:
                yield doc
            doc, opened = [], True
        elif line.strip() and not _WIKI_HEADING.match(line):
            opened = True
            doc.extend(split_sentences(_unescape_wikitext(line)))
    if opened:
        yield doc


def read_sentence_per_line(path: str, stats: Optional[CorpusStats] = None,
                           errors: str = "skip") -> Iterator[Document]:
    """Documents in google-research/bert's layout: one sentence per line, a blank line
    between documents."""
    stats = stats if stats is not None else CorpusStats()
    doc: Document = []
    for _, line in _read_lines(path, stats, errors):
        line = line.strip()
        if line:
            doc.append(line)
        else:
            if doc:
                yield doc
            doc = []
    if doc:
        yield doc


_PG_MARKER = re.compile(r"^\s*\*\*\*\s*(START|END) OF (THE|THIS) PROJECT GUTENBERG EBOOK",
                        re.IGNORECASE)
_PG_NOISE = re.compile(r"^\s*(End of (the )?Project Gutenberg|Produced by|\[Illustration)",
                       re.IGNORECASE)


def strip_gutenberg(lines: Sequence[str]) -> Tuple[List[str], bool]:
    """The body of a Project Gutenberg book: the lines strictly between the START and END
    markers (a START marker may wrap onto a second line ending in ``***``), without the
    ``Produced by``/``End of the Project Gutenberg`` paragraphs. Returns ``(lines, found)``;
    without markers the lines come back unchanged and ``found`` is False."""
    start = end = None
    for i, line in enumerate(lines):
        m = _PG_MARKER.match(line)
        if m and m.group(1).upper() == "START" and start is None:
            j = i
            while not lines[j].rstrip().endswith("***") and j + 1 < len(lines) and j < i + 3:
                j += 1
            start = j + 1
        elif m and m.group(1).upper() == "END" and start is not None:
            end = i
            break
    if start is None:
        return list(lines), False
    body = list(lines[start:end])
    # drop whole paragraphs that are Gutenberg credits rather than the book
    out: List[str] = []
    skipping = False
    for line in body:
        if not line.strip():
            skipping = False
        elif _PG_NOISE.match(line):
            skipping = True
        if not skipping:
            out.append(line)
    return out, True


def read_gutenberg(path: str, stats: Optional[CorpusStats] = None,
                   errors: str = "skip") -> Iterator[Document]:
    """One Project Gutenberg book as one document: header and licence footer stripped,
    hard-wrapped lines joined into paragraphs, paragraphs split into sentences."""
    stats = stats if stats is not None else CorpusStats()
    lines = [line for _, line in _read_lines(path, stats, errors)]
    body, found = strip_gutenberg(lines)
    if not found:
        stats.files_without_gutenberg_markers += 1
        warnings.warn(f"{path}: no '*** START OF THE PROJECT GUTENBERG EBOOK' marker; "
                      f"using the whole file")
    doc: Document = []
    paragraph: List[str] = []
    for line in body + [""]:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            doc.extend(split_sentences(" ".join(paragraph).replace("_", "")))
            paragraph = []
    yield doc


_READERS = {"wikitext": read_wikitext, "lines": read_sentence_per_line,
            "gutenberg": read_gutenberg}


def detect_layout(path: str) -> str:
    """``"gutenberg"`` if a Gutenberg START marker is in the first 1000 lines, ``"wikitext"``
    for ``*.tokens`` files or a first line `` = Title = ``, else ``"lines"``."""
    with open(path, "rb") as f:
        head = [raw.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
                for _, raw in zip(range(1000), f)]
    if any(_PG_MARKER.match(line) for line in head):
        return "gutenberg"
    first = next((line for line in head if line.strip()), "")
    if path.endswith(".tokens") or _WIKI_TITLE.match(first):
        return "wikitext"
    return "lines"


def expand_paths(paths: Sequence[str]) -> List[str]:
    """Files named by ``paths``; a directory stands for its ``*.txt``/``*.tokens`` files."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.txt"))
                           + glob.glob(os.path.join(p, "*.tokens")))
            files.extend(f for f in found if os.path.basename(f) != "SOURCE.md")
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return files


def read_corpus(paths: Sequence[str], layout: str = "auto", stats: Optional[CorpusStats] = None,
                errors: str = "skip") -> List[Document]:
    """Every document in ``paths`` (files or directories), as lists of sentences.

    ``layout`` is ``"wikitext"``, ``"lines"`` (one sentence per line, blank line between
    documents), ``"gutenberg"`` or ``"auto"`` (decided per file by :func:`detect_layout`).
    Empty documents are dropped and counted in ``stats``.
    """
    if layout != "auto" and layout not in _READERS:
        raise ValueError(f"layout must be 'auto' or one of {sorted(_READERS)}, got {layout!r}")
    stats = stats if stats is not None else CorpusStats()
    docs: List[Document] = []
    for path in expand_paths(paths):
        reader = _READERS[detect_layout(path) if layout == "auto" else layout]
        for doc in reader(path, stats, errors):
            if doc:
                docs.append(doc)
            else:
                stats.empty_documents += 1
    return docs


# --- tokenization ------------------------------------------------------------------------
_TOKENIZER = None


UNKNOWN_MARKERS = ("<unk>",)   # WikiText's placeholder for rare words -> [UNK]


def _encode(text: str) -> List[int]:
    """WordPiece ids of ``text``; WikiText's ``<unk>`` becomes ``[UNK]`` (not ``< un ##k >``)."""
    for marker in UNKNOWN_MARKERS:
        if marker in text:
            ids: List[int] = []
            for k, part in enumerate(text.split(marker)):
                ids += ([_TOKENIZER.unk_id] if k else []) + _TOKENIZER.encode(part)
            return ids
    return _TOKENIZER.encode(text)


def _tokenize_one(doc: Document) -> IdDocument:
    return [ids for ids in (_encode(s) for s in doc) if ids]


def _set_worker_state(tokenizer=None, docs=None) -> None:
    global _TOKENIZER, _DOCS
    if tokenizer is not None:
        _TOKENIZER = tokenizer
    if docs is not None:
        _DOCS = docs


def tokenize_documents(docs: Sequence[Document], tokenizer, num_workers: int = 1,
                       stats: Optional[CorpusStats] = None,
                       progress: bool = False) -> List[IdDocument]:
    """WordPiece ids of every sentence; documents left empty are dropped and counted."""
    stats = stats if stats is not None else CorpusStats()
    if num_workers <= 1:
        _set_worker_state(tokenizer=tokenizer)
        out = [_tokenize_one(d) for d in _progress(docs, progress, "tokenizing")]
    else:
        with _pool(num_workers, tokenizer=tokenizer) as pool:
            out = list(_progress(pool.imap(_tokenize_one, docs, chunksize=1), progress,
                                 "tokenizing", total=len(docs)))
    kept = []
    for d in out:
        if not d:
            stats.empty_documents += 1
            continue
        stats.documents += 1
        stats.sentences += len(d)
        stats.tokens += sum(len(s) for s in d)
        stats.one_sentence_documents += len(d) == 1
        kept.append(d)
    return kept


def _pool(num_workers: int, **state):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ctx.Pool(num_workers, initializer=_set_worker_state, initargs=(state.get("tokenizer"),
                                                                         state.get("docs")))


def _progress(it, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total)


# --- next-sentence pairs -----------------------------------------------------------------
def _truncate_pair(a: List[int], b: List[int], max_num_tokens: int) -> None:
    """Shorten the longer side until ``len(a) + len(b) <= max_num_tokens``: A loses tokens at
    its front, B at its back, so the A|B junction of a "next" pair stays intact."""
    while len(a) + len(b) > max_num_tokens:
        if len(a) > len(b):
            del a[0]
        else:
            b.pop()


def _split_long(doc: IdDocument, max_num_tokens: int, stats: CorpusStats) -> IdDocument:
    out = []
    for sent in doc:
        if len(sent) > max_num_tokens:
            stats.long_sentences += 1
            out.extend(sent[i:i + max_num_tokens] for i in range(0, len(sent), max_num_tokens))
        else:
            out.append(sent)
    return out


def create_pair_instances(docs: Sequence[IdDocument], doc_index: int, max_seq_length: int,
                          short_seq_prob: float, rng: random.Random, cls_id: int, sep_id: int,
                          stats: Optional[CorpusStats] = None
                          ) -> List[Tuple[List[int], int, bool]]:
    """Sentence pairs from document ``doc_index``: ``(tokens, len_a, is_random_next)`` with
    ``tokens = [CLS] A [SEP] B [SEP]``.

    Consecutive sentences are packed into a chunk of about ``max_seq_length - 3`` tokens (with
    probability ``short_seq_prob`` a random shorter target, so the model also sees short
    inputs); the chunk is cut at a random sentence boundary into A and B (a chunk of one
    sentence is cut at a random token: "sentences" are spans of text, as in the BERT paper).
    Half of the time (and always for a one-token chunk) B is replaced by text from a random
    other document and the unused sentences go back to the pool.
    """
    stats = stats if stats is not None else CorpusStats()
    max_num_tokens = max_seq_length - 3
    if max_num_tokens < 2:
        raise ValueError(f"max_seq_length must be at least 5, got {max_seq_length}")
    document = _split_long(docs[doc_index], max_num_tokens, stats)
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_num_tokens)
    instances = []
    chunk: List[List[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            split_sentence = len(chunk) == 1 and len(chunk[0]) >= 2
            if split_sentence:   # one sentence: cut it in two, still genuinely consecutive
                cut = rng.randint(1, len(chunk[0]) - 1)
                chunk = [chunk[0][:cut], chunk[0][cut:]]
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                b_target = max(1, target - len(a))
                other = doc_index
                for _ in range(10):
                    other = rng.randint(0, len(docs) - 1)
                    if other != doc_index:
                        break
                other_doc = docs[other]
                b: List[int] = []
                for s in other_doc[rng.randint(0, len(other_doc) - 1):]:
                    b.extend(s)
                    if len(b) >= b_target:
                        break
                if not split_sentence:
                    i -= len(chunk) - a_end    # put the unused sentences back
            else:
                is_random_next = False
                b = [t for s in chunk[a_end:] for t in s]
            _truncate_pair(a, b, max_num_tokens)
            if a and b:
                instances.append(([cls_id] + a + [sep_id] + b + [sep_id], len(a), is_random_next))
                stats.instances += 1
                stats.random_next += is_random_next
            chunk, length = [], 0
            target = max_num_tokens
            if rng.random() < short_seq_prob:
                target = rng.randint(2, max_num_tokens)
        i += 1
    return instances


# --- masking -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingConfig:
    """How tokens are chosen for the masked-LM task and what replaces them."""

    vocab_size: int
    mask_id: int
    special_ids: Tuple[int, ...]            # never masked, never used as a random replacement
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word: bool = False
    # whole-word masking: is_continuation[id] is True for WordPiece pieces ``##...``
    is_continuation: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    # ids a random replacement may take (default: every id but ``special_ids``)
    replacement_ids: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "MaskingConfig":
        """Special ids from the tokenizer; random replacements are real tokens only (never
        ``[PAD]``, ``[CLS]``, ``[unused12]`` ...)."""
        tokens = tokenizer.vocab.idx_to_token
        cont = np.array([t.startswith("##") for t in tokens], dtype=bool)
        bracketed = np.array([t.startswith("[") and t.endswith("]") for t in tokens], dtype=bool)
        special = tuple(sorted({tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id,
                                tokenizer.mask_id, tokenizer.unk_id}))
        return cls(vocab_size=len(tokens), mask_id=tokenizer.mask_id, special_ids=special,
                   is_continuation=cont,
                   replacement_ids=np.flatnonzero(~bracketed).astype(np.int32), **kwargs)

    def replacement_pool(self) -> np.ndarray:
        if self.replacement_ids is not None:
            return self.replacement_ids
        pool = np.ones(self.vocab_size, dtype=bool)
        pool[list(self.special_ids)] = False
        return np.flatnonzero(pool).astype(np.int32)


def mask_instance(tokens: np.ndarray, cfg: MaskingConfig, rng: np.random.Generator,
                  pool: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one sequence. Returns ``(input_ids, positions, labels)``.

    Of the eligible tokens (not ``special_ids``: never ``[CLS]``/``[SEP]``/padding),
    ``masked_lm_prob`` are chosen (stochastically rounded, at least one, at most
    ``max_predictions_per_seq``); with ``whole_word`` all pieces of a word are chosen
    together. Each chosen token becomes ``[MASK]`` (80%), a random token (10%) or stays (10%).
    """
    tokens = np.asarray(tokens)
    eligible = ~np.isin(tokens, cfg.special_ids)
    idx = np.flatnonzero(eligible)
    if len(idx) == 0:
        return tokens.copy(), idx.astype(np.int32), idx.astype(np.int32)
    num = int(np.floor(len(idx) * cfg.masked_lm_prob + rng.random()))
    num = min(cfg.max_predictions_per_seq, max(1, num))
    if cfg.whole_word and cfg.is_continuation is not None:
        # a word = a piece followed by its ``##`` continuations (all eligible, adjacent)
        starts = ~cfg.is_continuation[tokens[idx]]
        starts[0] = True
        starts[1:] |= np.diff(idx) != 1
        words = np.split(idx, np.flatnonzero(starts)[1:])
        chosen: List[int] = []
        for w in rng.permutation(len(words)):
            if len(chosen) + len(words[w]) > num:
                continue
            chosen.extend(words[w])
            if len(chosen) == num:
                break
        positions = np.sort(np.asarray(chosen, dtype=np.int64))
    else:
        positions = np.sort(rng.choice(idx, size=num, replace=False))
    labels = tokens[positions].copy()
    out = tokens.copy()
    r = rng.random(len(positions))
    out[positions[r < 0.8]] = cfg.mask_id
    rand = positions[r >= 0.9]
    pool = cfg.replacement_pool() if pool is None else pool
    out[rand] = pool[rng.integers(0, len(pool), size=len(rand))]
    return out, positions.astype(np.int32), labels.astype(np.int32)


# --- packing into fixed-size arrays ------------------------------------------------------
def pack_instances(instances: Sequence[Tuple[List[int], int, bool]], max_seq_length: int,
                   pad_id: int) -> Dict[str, np.ndarray]:
    """Unmasked pairs as padded arrays: ``input_ids`` (N, L), ``segment_ids``,
    ``valid_length`` (N,), ``nsp_label`` (N,: 1 = B is the actual next segment)."""
    n = len(instances)
    ids = np.full((n, max_seq_length), pad_id, dtype=np.int32)
    seg = np.zeros((n, max_seq_length), dtype=np.int32)
    valid = np.zeros(n, dtype=np.int32)
    nsp = np.zeros(n, dtype=np.int32)
    for k, (tokens, len_a, is_random) in enumerate(instances):
        ids[k, :len(tokens)] = tokens
        seg[k, len_a + 2:len(tokens)] = 1
        valid[k] = len(tokens)
        nsp[k] = 0 if is_random else 1
    return {"input_ids": ids, "segment_ids": seg, "valid_length": valid, "nsp_label": nsp}


def mask_packed(packed: Dict[str, np.ndarray], cfg: MaskingConfig,
                rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Mask every row of :func:`pack_instances` output; adds ``masked_positions``,
    ``masked_ids`` and ``masked_weights`` (N, max_predictions_per_seq; weight 0 = padding slot)."""
    n, P = len(packed["valid_length"]), cfg.max_predictions_per_seq
    out = dict(packed)
    ids = packed["input_ids"].copy()
    pos = np.zeros((n, P), dtype=np.int32)
    lab = np.zeros((n, P), dtype=np.int32)
    wt = np.zeros((n, P), dtype=np.float32)
    pool = cfg.replacement_pool()
    for k in range(n):
        v = packed["valid_length"][k]
        masked, p, l = mask_instance(ids[k, :v], cfg, rng, pool)
        ids[k, :v] = masked
        pos[k, :len(p)], lab[k, :len(l)], wt[k, :len(p)] = p, l, 1.0
    out.update(input_ids=ids, masked_positions=pos, masked_ids=lab, masked_weights=wt)
    return out


def unmask(masked: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Undo :func:`mask_packed`: the original tokens, without the masked-LM columns."""
    ids = masked["input_ids"].copy()
    rows, slots = np.nonzero(masked["masked_weights"] > 0)
    ids[rows, masked["masked_positions"][rows, slots]] = masked["masked_ids"][rows, slots]
    keep = ("segment_ids", "valid_length", "nsp_label")
    return dict({k: masked[k] for k in keep}, input_ids=ids)


# --- static mode: shards written by worker processes ------------------------------------
_DOCS: Sequence[IdDocument] = ()


def _read_tokenize_file(job: Tuple[str, str, str]) -> Tuple[List[IdDocument], CorpusStats]:
    """Worker: read one file and tokenize its documents."""
    path, layout, errors = job
    stats = CorpusStats()
    docs = read_corpus([path], layout, stats, errors)
    return tokenize_documents(docs, _TOKENIZER, 1, stats), stats


def _make_shard(task: dict) -> dict:
    """Worker: pairs + masking for the documents of one shard, written atomically to .npz."""
    docs = _DOCS
    rng = random.Random(task["seed"])
    nrng = np.random.default_rng(task["seed"])
    stats = CorpusStats()
    instances = []
    for _ in range(task["dupe_factor"]):
        for d in task["doc_indices"]:
            instances.extend(create_pair_instances(docs, d, task["max_seq_length"],
                                                   task["short_seq_prob"], rng, task["cls_id"],
                                                   task["sep_id"], stats))
    rng.shuffle(instances)
    arrays = mask_packed(pack_instances(instances, task["max_seq_length"], task["pad_id"]),
                         task["masking"], nrng)
    with atomic_path(task["path"]) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return {"path": task["path"], "instances": len(instances),
            "tokens": int(arrays["valid_length"].sum()), "stats": stats.to_dict()}


def create_pretraining_data(inputs: Sequence[str], output_dir: str, tokenizer,
                            max_seq_length: int = 128, short_seq_prob: float = 0.1,
                            masked_lm_prob: float = 0.15, max_predictions_per_seq: int = 20,
                            whole_word_masking: bool = False, dupe_factor: int = 1,
                            num_shards: Optional[int] = None, num_workers: int = 1,
                            seed: int = 12345, layout: str = "auto", errors: str = "skip",
                            progress: bool = True) -> dict:
    """Static mode: read ``inputs``, tokenize, pair and mask ``dupe_factor`` times (each time
    differently), and write ``shard-XXXXX.npz`` files plus ``meta.json`` into ``output_dir``.

    Tokenizing and shard creation run in ``num_workers`` processes (documents are dealt
    round-robin to ``num_shards`` shards, default ``num_workers``). Returns the metadata,
    including the counts of skipped input and ``tokens_per_second`` (input WordPiece tokens
    per wall-clock second, reading included).
    """
    t0 = time.time()
    stats = CorpusStats()
    files = expand_paths(inputs)
    jobs = [(f, layout, errors) for f in files]
    if num_workers <= 1:
        _set_worker_state(tokenizer=tokenizer)
        parts = [_read_tokenize_file(j) for j in _progress(jobs, progress, "reading")]
    else:
        with _pool(num_workers, tokenizer=tokenizer) as pool:
            parts = list(_progress(pool.imap(_read_tokenize_file, jobs), progress, "reading",
                                   total=len(jobs)))
    id_docs = []
    for docs_of_file, file_stats in parts:
        id_docs.extend(docs_of_file)
        stats.merge(file_stats)
    if not id_docs:
        raise ValueError(f"empty corpus: no document with any text in {list(inputs)} "
                         f"(counts: {stats.to_dict()})")
    num_shards = num_shards or max(1, num_workers)
    cfg = MaskingConfig.from_tokenizer(tokenizer, masked_lm_prob=masked_lm_prob,
                                       max_predictions_per_seq=max_predictions_per_seq,
                                       whole_word=whole_word_masking)
    os.makedirs(output_dir, exist_ok=True)
    tasks = [dict(seed=seed * 1000 + k, doc_indices=list(range(k, len(id_docs), num_shards)),
                  dupe_factor=dupe_factor, max_seq_length=max_seq_length,
                  short_seq_prob=short_seq_prob, cls_id=tokenizer.cls_id,
                  sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id, masking=cfg,
                  path=os.path.join(output_dir, f"shard-{k:05d}-of-{num_shards:05d}.npz"))
             for k in range(num_shards)]
    if num_workers <= 1:
        _set_worker_state(docs=id_docs)
        results = [_make_shard(t) for t in _progress(tasks, progress, "shards")]
    else:
        with _pool(num_workers, docs=id_docs) as pool:
            results = list(_progress(pool.imap_unordered(_make_shard, tasks), progress,
                                     "shards", total=len(tasks)))
    for r in results:
        stats.instances += r["stats"]["instances"]
        stats.random_next += r["stats"]["random_next"]
        stats.long_sentences += r["stats"]["long_sentences"]
    seconds = time.time() - t0
    meta = {
        "inputs": [os.path.abspath(f) for f in files], "max_seq_length": max_seq_length,
        "short_seq_prob": short_seq_prob, "masked_lm_prob": masked_lm_prob,
        "max_predictions_per_seq": max_predictions_per_seq,
        "whole_word_masking": whole_word_masking, "dupe_factor": dupe_factor, "seed": seed,
        "vocab_size": len(tokenizer), "num_workers": num_workers,
        "shards": sorted(os.path.basename(r["path"]) for r in results),
        "stats": stats.to_dict(), "seconds": round(seconds, 3),
        "tokens_per_second": round(stats.tokens / seconds, 1),
    }
    write_json(os.path.join(output_dir, "meta.json"), meta)
    return meta


def load_shards(directory: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """All shards of a static data folder concatenated, and its ``meta.json``."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{directory}: not a pre-training data folder (no meta.json); "
                                f"create one with `bert-gluon create-pretraining-data`")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    parts = []
    for name in meta["shards"]:
        with np.load(os.path.join(directory, name)) as z:
            parts.append({k: z[k] for k in z.files})
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return arrays, meta


# --- the data a training loop sees -------------------------------------------------------
class PretrainingData:
    """Arrays for one epoch: the same every epoch (static) or freshly masked (``dynamic``).

    Dynamic masking re-masks the unmasked pairs with a generator seeded by
    ``(seed, epoch)``, so any epoch can be re-created exactly (which ``--resume`` needs).
    """

    def __init__(self, arrays: Dict[str, np.ndarray], masking: Optional[MaskingConfig] = None,
                 dynamic: bool = False, seed: int = 0):
        if dynamic and masking is None:
            raise ValueError("dynamic masking needs a MaskingConfig")
        self.arrays, self.masking, self.dynamic, self.seed = arrays, masking, dynamic, seed
        if not dynamic and "masked_positions" not in arrays:
            if masking is None:
                raise ValueError("unmasked arrays need a MaskingConfig")
            self.arrays = mask_packed(arrays, masking, np.random.default_rng([seed, 0]))

    def __len__(self) -> int:
        return len(self.arrays["valid_length"])

    @classmethod
    def from_documents(cls, id_docs: Sequence[IdDocument], tokenizer, max_seq_length: int = 128,
                       short_seq_prob: float = 0.1, dupe_factor: int = 1, seed: int = 0,
                       dynamic: bool = True, stats: Optional[CorpusStats] = None,
                       **masking_kwargs) -> "PretrainingData":
        """Pairs made in memory (``dupe_factor`` passes), masked statically or dynamically."""
        if not id_docs:
            raise ValueError("empty corpus: no documents to make pre-training pairs from")
        rng = random.Random(seed)
        instances = []
        for _ in range(dupe_factor):
            for d in range(len(id_docs)):
                instances.extend(create_pair_instances(id_docs, d, max_seq_length, short_seq_prob,
                                                       rng, tokenizer.cls_id, tokenizer.sep_id,
                                                       stats))
        rng.shuffle(instances)
        cfg = MaskingConfig.from_tokenizer(tokenizer, **masking_kwargs)
        return cls(pack_instances(instances, max_seq_length, tokenizer.pad_id), cfg, dynamic, seed)

    @classmethod
    def from_shards(cls, directory: str, tokenizer, dynamic: bool = False,
                    seed: int = 0) -> "PretrainingData":
        """A folder written by :func:`create_pretraining_data`. With ``dynamic`` the stored
        masks are undone and every epoch is masked afresh with the folder's settings."""
        arrays, meta = load_shards(directory)
        if meta["vocab_size"] != len(tokenizer):
            raise ValueError(f"{directory}: data was made with a {meta['vocab_size']}-token "
                             f"vocabulary, the tokenizer has {len(tokenizer)}")
        cfg = MaskingConfig.from_tokenizer(tokenizer, masked_lm_prob=meta["masked_lm_prob"],
                                           max_predictions_per_seq=meta["max_predictions_per_seq"],
                                           whole_word=meta["whole_word_masking"])
        if dynamic:
            arrays = unmask(arrays)
        data = cls(arrays, cfg, dynamic, seed)
        data.meta = meta
        return data

    def epoch_arrays(self, epoch: int) -> Dict[str, np.ndarray]:
        if not self.dynamic:
            return self.arrays
        return mask_packed(self.arrays, self.masking, np.random.default_rng([self.seed, epoch]))


BATCH_KEYS = ("input_ids", "segment_ids", "valid_length", "masked_positions", "masked_ids",
              "masked_weights", "nsp_label")


def iterate_batches(arrays: Dict[str, np.ndarray], batch_size: int, seed: int = 0, epoch: int = 0,
                    start_batch: int = 0, shuffle: bool = True, part_index: int = 0,
                    num_parts: int = 1, drop_last: bool = True
                    ) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """``(batch_index, batch)`` for one epoch, in an order fixed by ``(seed, epoch)``.

    ``start_batch`` skips batches already consumed (the data position saved in a
    checkpoint). ``part_index``/``num_parts`` give each distributed worker its own disjoint
    slice of the data. The last incomplete batch is dropped unless ``drop_last=False``.
    """
    n = len(arrays["valid_length"])
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order[part_index::num_parts][:n // num_parts]   # equal share for every worker
    count = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    for b in range(start_batch, count):
        sel = order[b * batch_size:(b + 1) * batch_size]
        yield b, {k: arrays[k][sel] for k in BATCH_KEYS}


def num_batches(arrays: Dict[str, np.ndarray], batch_size: int, num_parts: int = 1) -> int:
    return len(arrays["valid_length"]) // num_parts // batch_size

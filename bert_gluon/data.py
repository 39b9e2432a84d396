"""Fine-tuning data: GLUE MRPC / SST-2 and any TSV/CSV file → BERT inputs → bucketed batches.

    rows of a TSV/CSV ──read_examples──► (text_a[, text_b][, label])      raw examples
                      ──BERTDatasetTransform──► (token ids, valid length, segment ids[, label])
                      ──make_dataloader──► FixedBucketSampler + dynamic padding → DataLoader

Built-in tasks (``TASKS``) know their files and columns. Their folder is found at an
explicit path, else the task's environment variable (``MRPC_DIR``, ``SST2_DIR``), else
``../shared/data/<name>`` next to the repository, else the download cache
``$BERT_GLUON_HOME/data/<name>`` (default ``~/.bert_gluon/data``), where it is downloaded
from the public GLUE/GluonNLP URLs with checksum verification when absent.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import gluonnlp as nlp
import mxnet as mx
import numpy as np

from .fileio import atomic_path
from .tokenization import Tokenizer

__all__ = ["DataError", "TaskSpec", "TASKS", "ReadStats", "read_examples", "load_task",
           "task_dir", "download", "download_task", "BERTDatasetTransform", "transform_examples",
           "make_dataloader", "batchify_fn"]

Column = Union[int, str]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files live and which columns hold text and label.

    ``files`` maps a split to a file name; ``test`` files carry no label. Columns are header
    names (or 0-based indices). ``class_labels=None`` means regression.
    """

    name: str
    env: str
    folder: str
    text_columns: Tuple[Column, ...]
    label_column: Optional[Column]
    class_labels: Optional[Tuple[str, ...]]
    files: Dict[str, str] = field(default_factory=lambda: {
        "train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"})
    positive_label: Optional[str] = "1"

    @property
    def pair(self) -> bool:
        return len(self.text_columns) == 2


TASKS: Dict[str, TaskSpec] = {
    # GLUE MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String (test: index instead of Quality)
    "mrpc": TaskSpec("mrpc", "MRPC_DIR", "mrpc", ("#1 String", "#2 String"), "Quality",
                     ("0", "1")),
    # GLUE SST-2: sentence, label (test: index, sentence)
    "sst-2": TaskSpec("sst-2", "SST2_DIR", "sst-2", ("sentence",), "label", ("0", "1")),
}
TASKS["sst2"] = TASKS["sst-2"]


def cache_dir() -> str:
    """``$BERT_GLUON_HOME/data`` (default ``~/.bert_gluon/data``)."""
    home = os.environ.get("BERT_GLUON_HOME") or os.path.join(os.path.expanduser("~"), ".bert_gluon")
    return os.path.join(home, "data")


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks are "
                         f"{sorted(set(t.name for t in TASKS.values()))} "
                         f"(or give --train-file/--dev-file with column options)") from None


def task_dir(task: Union[str, TaskSpec], data_dir: Optional[str] = None,
             download_missing: bool = True) -> str:
    """The folder holding ``task``'s files (see the module docstring for the search order)."""
    spec = get_task(task) if isinstance(task, str) else task
    if data_dir:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"{spec.name}: data folder {data_dir} does not exist")
        return data_dir
    if os.environ.get(spec.env):
        path = os.environ[spec.env]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{spec.name}: ${spec.env}={path} is not a folder")
        return path
    shared = os.path.join(REPO_ROOT, "..", "shared", "data", spec.folder)
    if os.path.isfile(os.path.join(shared, spec.files["train"])):
        return os.path.abspath(shared)
    cached = os.path.join(cache_dir(), spec.folder)
    if all(os.path.isfile(os.path.join(cached, f)) for f in spec.files.values()):
        return cached
    if not download_missing:
        raise FileNotFoundError(_where_msg(spec, cached))
    try:
        download_task(spec.name, cached)
    except OSError as e:
        raise FileNotFoundError(f"{_where_msg(spec, cached)}\n(download failed: {e})") from None
    return cached


def _where_msg(spec: TaskSpec, cached: str) -> str:
    names = ", ".join(spec.files.values())
    return (f"{spec.name}: data not found. Put {names} (the GLUE files) in a folder and pass "
            f"it with --data-dir or ${spec.env}, or into {cached}; it is downloaded there "
            f"automatically when the network is reachable.")


# --------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------
@dataclass
class ReadStats:
    """What :func:`read_examples` saw: rows kept, and rows skipped (with ``skip_bad``)."""

    path: str
    rows: int = 0
    skipped: int = 0
    errors: List[str] = field(default_factory=list)


def _decoded_lines(path: str):
    """Yield ``(line_number, text)``; non-UTF-8 bytes raise with the line number."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not valid UTF-8 "
                                        f"(byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            yield lineno, text.rstrip("\r\n")


def _column_index(col: Column, header: Optional[List[str]], path: str) -> int:
    if isinstance(col, int) or (isinstance(col, str) and col.isdigit()):
        return int(col)
    if header is None:
        raise DataError(f"{path}: column {col!r} given by name but the file has no header")
    if col not in header:
        raise DataError(f"{path}:1: no column {col!r} in the header {header}")
    return header.index(col)


def read_examples(path: str, text_columns: Sequence[Column], label_column: Optional[Column] = None,
                  class_labels: Optional[Sequence[str]] = None, header: bool = True,
                  delimiter: Optional[str] = None, skip_bad: bool = False,
                  stats: Optional[ReadStats] = None) -> List[tuple]:
    """Rows of a TSV/CSV file as ``(text_a[, text_b][, label])`` tuples of strings.

    ``text_columns`` (one or two) and ``label_column`` are header names or 0-based indices;
    ``label_column=None`` reads unlabelled rows. ``delimiter`` defaults to ``,`` for ``.csv``
    and tab otherwise; TSV is split on tabs with no quoting (GLUE's format, quotes are text),
    CSV follows the csv module's quoting. A UTF-8 BOM on the first line is ignored; text is
    stripped. A bad row — wrong number of fields, empty text, a label outside
    ``class_labels`` (or not a number for regression), bytes that are not UTF-8 — raises
    :class:`DataError` naming ``path:line``, or with ``skip_bad=True`` is skipped and counted
    in ``stats``.
    """
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"text_columns must name one or two columns, got {list(text_columns)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if delimiter is None:
        delimiter = "," if path.lower().endswith(".csv") else "\t"
    stats = stats if stats is not None else ReadStats(path)
    stats.path = path
    labels = list(class_labels) if class_labels is not None else None

    def bad(err: DataError) -> None:
        if not skip_bad:
            raise err
        stats.skipped += 1
        stats.errors.append(str(err))

    lines = _decoded_lines(path)
    if delimiter != "\t":  # CSV: quoted fields may span lines; keep the line of each row start
        rows = _csv_rows(lines, delimiter)
    else:
        rows = ((n, t if isinstance(t, DataError) else t.split("\t")) for n, t in lines)

    head: Optional[List[str]] = None
    n_fields = None
    out: List[tuple] = []
    for lineno, fields in rows:
        if isinstance(fields, DataError):
            if lineno == 1 and header:
                raise fields
            bad(fields)
            continue
        if lineno == 1 and header:
            head = [h.strip() for h in fields]
            n_fields = len(head)
            cols = [_column_index(c, head, path) for c in text_columns]
            lab = None if label_column is None else _column_index(label_column, head, path)
            continue
        if n_fields is None:  # no header: the first row fixes the width
            n_fields = len(fields)
            cols = [_column_index(c, None, path) for c in text_columns]
            lab = None if label_column is None else _column_index(label_column, None, path)
            for c in cols + ([lab] if lab is not None else []):
                if c >= n_fields:
                    raise DataError(f"{path}:{lineno}: column {c} asked for but the row has "
                                    f"{n_fields} fields")
        if len(fields) == 1 and fields[0].strip() == "":
            continue  # blank line
        if len(fields) != n_fields:
            bad(DataError(f"{path}:{lineno}: expected {n_fields} fields, found {len(fields)}"))
            continue
        texts = [fields[c].strip() for c in cols]
        empty = [str(text_columns[i]) for i, t in enumerate(texts) if not t]
        if empty:
            bad(DataError(f"{path}:{lineno}: empty text in column {empty[0]!r}"))
            continue
        example = tuple(texts)
        if lab is not None:
            label = fields[lab].strip()
            if labels is not None and label not in labels:
                bad(DataError(f"{path}:{lineno}: label {label!r} is not one of {labels}"))
                continue
            if labels is None:
                try:
                    float(label)
                except ValueError:
                    bad(DataError(f"{path}:{lineno}: label {label!r} is not a number "
                                  f"(regression: no class labels given)"))
                    continue
            example += (label,)
        out.append(example)
        stats.rows += 1
    if head is None and n_fields is None:
        raise DataError(f"{path}: file is empty")
    return out


def _csv_rows(lines, delimiter: str):
    """``(line_number, fields)`` from decoded lines via the csv module."""
    buf, start = [], None
    for lineno, text in lines:
        if isinstance(text, DataError):
            yield lineno, text
            continue
        if start is None:
            start = lineno
        buf.append(text)
        try:
            parsed = list(csv.reader(io.StringIO("\n".join(buf)), delimiter=delimiter,
                                     strict=True))
        except csv.Error as e:
            yield start, DataError(f"line {start}: {e}")
            buf, start = [], None
            continue
        if "\n".join(buf).count('"') % 2:  # inside a quoted field: read on
            continue
        yield start, (parsed[0] if parsed else [""])
        buf, start = [], None


def load_task(task: str, split: str, data_dir: Optional[str] = None, skip_bad: bool = False,
              stats: Optional[ReadStats] = None) -> List[tuple]:
    """Raw examples of a built-in task's split (``train``, ``dev`` or ``test``; test has no
    labels)."""
    spec = get_task(task)
    if split not in spec.files:
        raise ValueError(f"{spec.name}: unknown split {split!r}; "
                         f"choose one of {sorted(spec.files)}")
    path = os.path.join(task_dir(spec, data_dir), spec.files[split])
    label = None if split == "test" else spec.label_column
    return read_examples(path, spec.text_columns, label, spec.class_labels, skip_bad=skip_bad,
                         stats=stats)


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------
def _digest(path: str, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, path: str, sha1: Optional[str] = None, sha256: Optional[str] = None,
             timeout: float = 60.0) -> str:
    """Fetch ``url`` to ``path`` (atomically) and check its checksum; an existing file with
    the right checksum is kept. A wrong checksum raises ``OSError`` and leaves no file."""
    checks = [(a, h) for a, h in (("sha1", sha1), ("sha256", sha256)) if h]

    def ok(p: str) -> bool:
        return all(_digest(p, a) == h for a, h in checks)

    if os.path.isfile(path) and checks and ok(path):
        return path
    from tqdm.auto import tqdm

    with atomic_path(path) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path),
                      leave=False) as bar:
                for chunk in iter(lambda: r.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        for algo, want in checks:
            got = _digest(tmp, algo)
            if got != want:
                raise OSError(f"{url}: {algo} checksum mismatch (got {got}, expected {want}); "
                              f"{path} not written")
    return path


_S3 = "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/gluon/dataset/GLUE/SST-2/"
# (url, sha1) of the raw files, as GluonNLP 0.10's GlueMRPC / GlueSST2 fetch them; the sha1s
# of the files built from them are GluonNLP's too (and match ../shared/data/*/SOURCE.md).
SOURCES: Dict[str, Dict[str, Tuple[str, str]]] = {
    "mrpc": {
        "msr_paraphrase_train.txt": (
            "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
            "716e0f67af962f08220b7e97d229b293077ef41f"),
        "msr_paraphrase_test.txt": (
            "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
            "4265196c15cf75620b0b592b8b921f543bda7e6c"),
        "dev_ids.tsv": (
            "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot"
            ".com/o/data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
            "506c7a1a5e0dd551ceec2f84070fa1a8c2bc4b41"),
    },
    "sst-2": {
        "train.zip": (_S3 + "train-ffbb67a5.zip", "bcde781bed5caa30d5e9a9d24e5c826965ed02a2"),
        "dev.zip": (_S3 + "dev-e166f986.zip", "85698e465ff6573fb80d0b34229c76df84cd766b"),
        "test.zip": (_S3 + "test-3ce80411.zip", "efac1c275553ed78500e9b8d8629408f5f867b20"),
    },
}
BUILT_SHA1 = {
    "mrpc": {"train.tsv": "131675ffd3d2f04f286049d31cca506c8acba69e",
             "dev.tsv": "e4486577c4cb2e5c2a3fd961eb24f03c623ea02d",
             "test.tsv": "3602b2ca26cf574e84183c14d6c0901669ee2d0a"},
    "sst-2": {"train.tsv": "ffbb67a55e27525e925b79fee110ca19585d70ca",
              "dev.tsv": "e166f986cec68fd4cca0ae5ce5869b917f88a2fa",
              "test.tsv": "3ce8041182bf82dbbbbfe13738b39d3c69722744"},
}


def download_task(task: str, root: Optional[str] = None,
                  sources: Optional[Dict[str, Tuple[str, str]]] = None,
                  built_sha1: Optional[Dict[str, str]] = None) -> str:
    """Download a built-in task's raw files into ``root`` and build ``train/dev/test.tsv``.

    MRPC is split into train/dev by GLUE's ``dev_ids.tsv`` exactly as GLUE's
    ``download_glue_data.py`` (and GluonNLP's ``GlueMRPC``) do; SST-2 comes as zips.
    Every raw file and every built file is checked against its sha1. ``sources`` /
    ``built_sha1`` override the URL table (used by the tests with a local server).
    """
    spec = get_task(task)
    root = root or os.path.join(cache_dir(), spec.folder)
    os.makedirs(root, exist_ok=True)
    sources = SOURCES[spec.name] if sources is None else sources
    built = BUILT_SHA1[spec.name] if built_sha1 is None else built_sha1
    raw = {name: download(url, os.path.join(root, name), sha1=sha1)
           for name, (url, sha1) in sources.items()}
    if spec.name == "mrpc":
        _build_mrpc(root, raw)
    else:
        for split in ("train", "dev", "test"):
            with zipfile.ZipFile(raw[f"{split}.zip"]) as zf:
                member = next(n for n in zf.namelist() if n.endswith(".tsv"))
                with zf.open(member) as src, atomic_path(os.path.join(root, f"{split}.tsv")) as tmp:
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    for name, sha1 in built.items():
        got = _digest(os.path.join(root, name), "sha1")
        if got != sha1:
            raise OSError(f"{os.path.join(root, name)}: sha1 {got} differs from the published "
                          f"{sha1}")
    return root


def _build_mrpc(root: str, raw: Dict[str, str]) -> None:
    with open(raw["dev_ids.tsv"], encoding="utf-8") as f:
        dev_ids = {tuple(line.strip().split("\t")) for line in f if line.strip()}
    with open(raw["msr_paraphrase_train.txt"], encoding="utf-8") as f:
        header, *rows = f.readlines()
    train, dev = [header], [header]
    for row in rows:
        label, id1, id2, s1, s2 = row.strip().split("\t")
        (dev if (id1, id2) in dev_ids else train).append(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    with open(raw["msr_paraphrase_test.txt"], encoding="utf-8") as f:
        _, *rows = f.readlines()
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
    for i, row in enumerate(rows):
        _, id1, id2, s1, s2 = row.strip().split("\t")
        test.append(f"{i}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    for name, lines in (("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)):
        with atomic_path(os.path.join(root, name)) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.writelines(lines)


# --------------------------------------------------------------------------------------
# Examples → BERT inputs
# --------------------------------------------------------------------------------------
class BERTDatasetTransform:
    """Raw example ``(text_a[, text_b][, label])`` → ``(token ids, valid length, segment ids
    [, label])`` as NumPy arrays, the seed's layout::

        [CLS] a1 a2 ... [SEP] b1 b2 ... [SEP] [PAD] ...
          0    0  0  ...  0    1  1  ...  1     0   ...     segment ids

    When the tokens do not fit in ``max_len`` the longer sentence loses its last token,
    repeatedly (BERT's ``_truncate_seq_pair``); ``num_truncated`` counts the examples cut.
    ``pad=True`` pads to ``max_len`` with the vocabulary's ``[PAD]`` id (use ``pad=False``
    with :func:`make_dataloader`'s dynamic padding). The label becomes its index in
    ``class_labels``, or a float32 when ``class_labels`` is ``None`` (regression);
    ``has_label=False`` returns three arrays.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int,
                 class_labels: Optional[Sequence[str]] = None, has_label: bool = True,
                 pad: bool = True, pair: bool = True):
        if max_len < (3 if pair else 2) + 1:
            raise ValueError(f"max_len={max_len} leaves no room for text")
        self.tokenizer, self.max_len, self.has_label = tokenizer, max_len, has_label
        self.pad, self.pair = pad, pair
        self.class_labels = list(class_labels) if class_labels is not None else None
        self._label_map = ({str(l): i for i, l in enumerate(self.class_labels)}
                           if self.class_labels is not None else None)
        self.num_truncated = 0

    def __call__(self, example: Sequence) -> Tuple[np.ndarray, ...]:
        n_text = 2 if self.pair else 1
        if len(example) != n_text + int(self.has_label):
            raise ValueError(f"expected {n_text} text field(s)"
                             f"{' and a label' if self.has_label else ''}, got {len(example)} "
                             f"fields: {example!r}")
        tok = self.tokenizer
        a = tok.tokenize(example[0])
        b = tok.tokenize(example[1]) if self.pair else []
        budget = self.max_len - (3 if self.pair else 2)
        if len(a) + len(b) > budget:
            self.num_truncated += 1
            while len(a) + len(b) > budget:
                if len(a) > len(b):
                    a.pop()
                else:
                    b.pop()
        tokens = [tok.vocab.cls_token] + a + [tok.vocab.sep_token]
        segments = [0] * len(tokens)
        if self.pair:
            tokens += b + [tok.vocab.sep_token]
            segments += [1] * (len(b) + 1)
        ids = tok.convert_tokens_to_ids(tokens)
        valid_length = len(ids)
        if self.pad:
            ids += [tok.pad_id] * (self.max_len - valid_length)
            segments += [0] * (self.max_len - valid_length)
        out = (np.array(ids, dtype="int32"), np.array(valid_length, dtype="int32"),
               np.array(segments, dtype="int32"))
        if not self.has_label:
            return out
        label = example[-1]
        if self._label_map is None:
            return out + (np.array(float(label), dtype="float32"),)
        try:
            return out + (np.array(self._label_map[str(label)], dtype="int32"),)
        except KeyError:
            raise ValueError(f"label {label!r} is not one of {self.class_labels}") from None


def transform_examples(examples: Sequence[tuple], transform: BERTDatasetTransform,
                       desc: str = "tokenizing", progress: bool = True) -> List[tuple]:
    """Apply ``transform`` to every example, with a progress bar unless ``progress=False``."""
    from tqdm.auto import tqdm

    return [transform(e) for e in tqdm(examples, desc=desc, leave=False, mininterval=1.0,
                                       disable=not progress)]


def batchify_fn(pad_id: int, has_label: bool = True, regression: bool = False):
    """Collate ``(ids, valid_length, segments[, label])`` samples into a batch, padding ids
    with ``pad_id`` and segments with 0 up to the longest sample (dynamic padding)."""
    fns = [nlp.data.batchify.Pad(axis=0, pad_val=pad_id, dtype="float32", ret_length=False),
           nlp.data.batchify.Stack(dtype="float32"),
           nlp.data.batchify.Pad(axis=0, pad_val=0, dtype="float32", ret_length=False)]
    if has_label:
        fns.append(nlp.data.batchify.Stack(dtype="float32" if regression else "int32"))
    return nlp.data.batchify.Tuple(*fns)


def make_dataloader(samples: Sequence[tuple], batch_size: int, pad_id: int, shuffle: bool,
                    num_buckets: int = 10, has_label: bool = True, regression: bool = False,
                    num_workers: int = 0) -> mx.gluon.data.DataLoader:
    """Length-bucketed batches with dynamic padding.

    ``FixedBucketSampler`` groups samples of similar valid length into ``num_buckets``
    buckets, so little compute goes to padding; with ``shuffle`` the order of samples within
    buckets and of the batches is random (from NumPy's RNG: seed it). ``shuffle=False`` keeps
    a fixed order; use :func:`sampler_order` to map outputs back to sample indices.
    """
    lengths = [int(s[1]) for s in samples]
    with warnings.catch_warnings():   # "some buckets are empty": harmless on small sets
        warnings.filterwarnings("ignore", message="Some buckets are empty")
        sampler = nlp.data.FixedBucketSampler(lengths, batch_size=batch_size,
                                              num_buckets=min(num_buckets, max(1, len(samples))),
                                              shuffle=shuffle)
    return mx.gluon.data.DataLoader(samples, batch_sampler=sampler,
                                    batchify_fn=batchify_fn(pad_id, has_label, regression),
                                    num_workers=num_workers)


def sampler_order(loader: mx.gluon.data.DataLoader) -> List[int]:
    """Sample indices in the order an unshuffled ``make_dataloader`` loader yields them."""
    return [i for batch in loader._batch_sampler for i in batch]

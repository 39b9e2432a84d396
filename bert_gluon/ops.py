"""Compiled CPU operators for what MXNet 1.9.1 runs slowly, loaded as an MXNet extension library.

- ``bg_self_attention`` (``csrc/attention.cc``): the attention core -- scores, masked softmax,
  dropout, weighted sum of values -- in one operator, forward and backward. MXNet's
  ``interleaved_matmul_selfatt_*`` run one small OpenBLAS GEMM per (batch, head) and its
  softmax-with-length and Dropout are slow on CPU: they were ~45 % of a MiniLM inference pass.
- ``bg_layer_norm`` and ``bg_add_norm`` (``csrc/layer_norm.cc``): LayerNorm, and the residual
  connection ``LayerNorm(x + dropout(y))`` in one pass; MXNet's own ``LayerNorm`` backward on
  CPU costs about ten times its forward, and its Dropout draws masks slowly.
- ``bg_softmax_ce`` (``csrc/softmax_ce.cc``): softmax cross-entropy per row, for the masked-LM
  loss over the 30522-token vocabulary, whose ``log_softmax`` backward is slow in MXNet 1.9.1.
- ``bg_int8_dense`` (``csrc/int8_dense.cc``): an INT8 dense layer for inference, on the CPU's
  AMX tiles or with AVX-512 VNNI where it has them, with on-the-fly activation scales and
  fused GELU: see :mod:`bert_gluon.quantization` (MXNet 1.9.1's oneDNN never reaches AMX).

Each is tested against MXNet's own operators (``tests/test_ops.py``; ``bg_int8_dense``
against an integer reference in NumPy, ``tests/test_quantization.py``), and the blocks in
:mod:`bert_gluon.layers` give the same numbers either way (to float32 rounding).

The library is compiled on first use with the system C++ compiler against the headers that
ship in the MXNet wheel (``mxnet/include/mxnet/lib_api.h``), cached under
``$BERT_GLUON_HOME/ops`` (default ``~/.bert_gluon/ops``) keyed by the source and MXNet
version, and loaded with ``mx.library.load``. The operators are CPU only, so they are used
when no GPU is visible; everything falls back to MXNet's operators, with a warning, when there
is no compiler.

``BERT_GLUON_FAST_OPS=0`` turns them off, ``=1`` insists on them (an error if they cannot be
built). :func:`builtin_ops` switches them off for a block of code, e.g. to export a symbol
that loads without this library.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Iterator, Optional

import mxnet as mx

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = sorted(glob.glob(os.path.join(_CSRC, "*.cc")))
_HEADERS = sorted(glob.glob(os.path.join(_CSRC, "*.h")))
# -march=native: the library is built on the machine that runs it (the cache key includes the
# CPU's feature flags); -ffast-math lets GCC vectorize expf (glibc's libmvec).
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++11"]
_lock = threading.Lock()
_state = {"loaded": None, "error": None, "disabled": 0}


def _mxnet_dir() -> str:
    return os.path.dirname(os.path.abspath(mx.__file__))


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def library_path() -> str:
    """Where the compiled library for these sources and this MXNet version lives."""
    key = hashlib.sha256(mx.__version__.encode() + " ".join(_FLAGS).encode() + _cpu_flags())
    for source in _SOURCES + _HEADERS:
        with open(source, "rb") as f:
            key.update(f.read())
    home = os.environ.get("BERT_GLUON_HOME") or os.path.join(os.path.expanduser("~"), ".bert_gluon")
    return os.path.join(home, "ops", f"libbg_ops-{key.hexdigest()[:12]}.so")


def build(path: Optional[str] = None) -> str:
    """Compile ``csrc/*.cc`` (+ MXNet's ``lib_api.cc``) into ``path``, atomically."""
    path = path or library_path()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++ or $CXX) to build bert_gluon's operators")
    mxdir = _mxnet_dir()
    lib_api = os.path.join(mxdir, "src", "lib_api.cc")
    include = os.path.join(mxdir, "include")
    if not os.path.isfile(lib_api):
        raise RuntimeError(f"this MXNet wheel has no {lib_api} to build extension operators")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, *_FLAGS, *_SOURCES, lib_api, "-I", include, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building bert_gluon's operators failed:\n"
                               f"{' '.join(cmd)}\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load() -> bool:
    """Build (once) and load the library; True when its operators are available."""
    with _lock:
        if _state["loaded"] is None:
            try:
                path = library_path()
                if not os.path.isfile(path):
                    build(path)
                mx.library.load(path, verbose=False)
                _state["loaded"] = True
            except Exception as e:     # no compiler, read-only home, ...: use MXNet's op
                _state["loaded"], _state["error"] = False, f"{type(e).__name__}: {e}"
                if os.environ.get("BERT_GLUON_FAST_OPS") == "1":
                    raise
                warnings.warn("bert_gluon: using MXNet's own attention, LayerNorm and "
                              "log_softmax (slower on CPU); the compiled operators are "
                              f"unavailable: {_state['error']}")
        return _state["loaded"]


def use_fast_ops() -> bool:
    """Whether graphs built now use the compiled operators: not turned off, no GPU visible
    (they are CPU only), and the library loads."""
    setting = os.environ.get("BERT_GLUON_FAST_OPS", "auto")
    if setting == "0" or _state["disabled"]:
        return False
    if setting != "1" and mx.context.num_gpus() > 0:
        return False
    return load()


@contextlib.contextmanager
def builtin_ops() -> Iterator[None]:
    """Within this block, graphs are built with MXNet's own operators (re-hybridize the
    model inside it): for exported symbols and INT8 graphs that must load anywhere."""
    _state["disabled"] += 1
    try:
        yield
    finally:
        _state["disabled"] -= 1


def mode_flag(F):
    """The ``mode`` input of the operators with dropout: ``Dropout(p=0.5)`` of a one, which is
    exactly 1 when MXNet predicts and 0 or 2 when it trains. Extension operators are not told
    MXNet's train/predict mode, and a hybridized graph is built once for both, so the mode
    travels as data and the operator decides at run time."""
    return F.Dropout(F.ones(shape=(1,)), p=0.5)


def softmax_cross_entropy(F, scores, label):
    """``-log softmax(scores)[label]`` over the last axis, one value per row (shape of
    ``label``): ``bg_softmax_ce`` when the compiled operators are in use, else MXNet's
    ``log_softmax`` + ``pick``. ``F`` is ``mx.nd`` or ``mx.sym`` (inside ``hybrid_forward``)."""
    if use_fast_ops():
        return F.bg_softmax_ce(scores, label)[0]
    return -F.pick(F.log_softmax(scores, axis=-1), label, axis=-1)

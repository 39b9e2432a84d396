"""Process-wide runtime set-up: OpenMP threads and the compute context.

MXNet 1.9 sizes its OpenMP pool to *half* the logical CPUs because it assumes
hyper-threading. On a machine without SMT (such as a 2-core cloud VM) that
leaves half the cores idle and halves matmul throughput. ``bert_gluon`` sets
``OMP_NUM_THREADS`` to the number of physical cores *before* MXNet is imported,
unless the user already chose a value.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np      # not mxnet: it must be imported after configure_threads


def physical_cores() -> int:
    """Number of physical cores this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and widest vector instructions, e.g. ``"AMD EPYC (AVX2, FMA)"``:
    benchmark results record it, since speed ratios depend on it (our compiled operators and
    oneDNN pick their kernels by ISA). ``"unknown"`` where ``cpuinfo`` is missing."""
    try:
        with open(cpuinfo) as f:
            info = f.read()
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                                   ("amx_tile", "AMX"), ("avx2", "AVX2"), ("fma", "FMA"))
           if flag in flags]
    if "avx512_bf16" in flags:
        isa.insert(isa.index("VNNI") + 1 if "VNNI" in isa else 1, "BF16")
    if "AVX-512" in isa:
        isa = [n for n in isa if n not in ("AVX2", "FMA")]
    return f"{fields.get('model name', 'unknown')} ({', '.join(isa) or 'no AVX2'})"


def configure_threads(num_threads: Optional[int] = None) -> int:
    """Set ``OMP_NUM_THREADS`` for MXNet (call before ``import mxnet``).

    An explicit ``num_threads`` wins; otherwise a value the user already put in the
    environment is kept; otherwise every physical core is used. Returns the count in force.
    """
    if num_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(int(num_threads))
    elif not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(physical_cores())
    return int(os.environ["OMP_NUM_THREADS"])


def default_context():
    """``mx.gpu(0)`` when a GPU is visible, else ``mx.cpu()``."""
    import mxnet as mx

    return mx.gpu(0) if mx.context.num_gpus() > 0 else mx.cpu()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and MXNet so a CPU run is repeatable."""
    import random

    import mxnet as mx

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


# how MXNet's Python side spells bfloat16 (``mx.nd.amp_cast(x, dtype=BFLOAT16)``)
BFLOAT16 = np.dtype([("bfloat16", np.uint16)])
_BF16: dict = {}


def bf16_supported() -> bool:
    """Whether MXNet runs a bfloat16 ``FullyConnected`` on this CPU (tried once on a tiny
    input). oneDNN needs AVX-512 for it; without AVX-512 BF16 (:func:`fast_bf16`) it emulates
    bfloat16, slower than float32."""
    if "ok" not in _BF16:
        import mxnet as mx

        try:
            x = mx.nd.amp_cast(mx.nd.ones((2, 4)), dtype=BFLOAT16)
            y = mx.nd.amp_cast(mx.nd.FullyConnected(x, x, num_hidden=2, no_bias=True),
                               dtype="float32")
            _BF16["ok"] = float(y[0, 0].asscalar()) == 4.0
            if not _BF16["ok"]:
                _BF16["error"] = "wrong result of a 2 x 4 product"
        except mx.MXNetError as e:
            _BF16.update(ok=False, error=str(e).strip().splitlines()[-1])
    return _BF16["ok"]


def require_bf16() -> None:
    """Raise ``RuntimeError`` saying why where :func:`bf16_supported` is False; warn where
    bfloat16 runs but only emulated (no :func:`fast_bf16`), slower than float32."""
    if not bf16_supported():
        raise RuntimeError("MXNet's oneDNN cannot run bfloat16 FullyConnected on this CPU "
                           "(it needs AVX-512): " + str(_BF16.get("error")))
    if not fast_bf16():
        import warnings

        warnings.warn("this CPU has no AVX-512 BF16 instructions: oneDNN emulates bfloat16 "
                      "here, slower than float32")


def fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bfloat16 dot products natively (AVX-512 BF16: AMD Zen 4,
    Intel Cooper Lake and later), where bfloat16 dense layers pay."""
    return "BF16" in cpu_description(cpuinfo)

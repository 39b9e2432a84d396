"""Process-wide runtime set-up: OpenMP threads and the compute context.

MXNet 1.9 sizes its OpenMP pool to *half* the logical CPUs because it assumes
hyper-threading. On a machine without SMT (such as a 2-core cloud VM) that
leaves half the cores idle and halves matmul throughput. ``bert_gluon`` sets
``OMP_NUM_THREADS`` to the number of physical cores *before* MXNet is imported,
unless the user already chose a value.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, List, Optional

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
    """``mx.gpu(0)`` when a GPU is visible and this MXNet build can compute on it, else
    ``mx.cpu()`` (with a warning saying why, where a GPU is there but unusable)."""
    import mxnet as mx

    if mx.context.num_gpus() > 0:
        try:
            check_gpu(mx.gpu(0))
            return mx.gpu(0)
        except RuntimeError as err:
            import warnings

            warnings.warn(f"{err} Using the CPU.")
    return mx.cpu()


def resolve_context(ctx=None):
    """``ctx`` checked with :func:`check_gpu`, or :func:`default_context` when it is None."""
    if ctx is None:
        return default_context()
    check_gpu(ctx)
    return ctx


# --- can this MXNet build compute on this GPU? ---------------------------------------------
_FATBIN_MAGIC = 0xBA55ED50


def cuda_archs(library: str) -> Dict[str, List[int]]:
    """The GPU code in a CUDA library's fat binary (ELF section ``.nv_fatbin``):
    ``{"sass": [...], "ptx": [...]}``, each a sorted list of compute capabilities times ten
    (``86`` is sm_86). Both empty for a library without GPU code, such as a CPU build.

    SASS is machine code for one GPU generation; PTX is compiled by the driver for any GPU of
    at least its capability (:func:`runs_on`)."""
    found: Dict[str, set] = {"sass": set(), "ptx": set()}
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:5] != b"\x7fELF\x02":
            raise ValueError(f"{library}: not a 64-bit ELF library")
        shoff, = struct.unpack_from("<Q", m, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", m, 0x3A)

        def section(i):   # (name offset, file offset, size)
            name, = struct.unpack_from("<I", m, shoff + i * shentsize)
            offset, size = struct.unpack_from("<QQ", m, shoff + i * shentsize + 24)
            return name, offset, size

        _, strtab, _ = section(shstrndx)
        for i in range(shnum):
            name, start, size = section(i)
            if m[strtab + name:strtab + name + 11] != b".nv_fatbin\0":
                continue
            p, end = start, start + size
            while p + 16 <= end:   # fat binaries, each a header and entries, 8-byte aligned
                magic, _, header, length = struct.unpack_from("<IHHQ", m, p)
                if magic != _FATBIN_MAGIC:
                    p += 8
                    continue
                q, stop = p + header, p + header + length
                while q < stop:   # entry: kind (1 PTX, 2 SASS), header size, payload size, arch
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", m, q)
                    arch, = struct.unpack_from("<I", m, q + 28)
                    if kind in (1, 2):
                        found["ptx" if kind == 1 else "sass"].add(arch)
                    q += entry_header + payload
                p = stop
    return {k: sorted(v) for k, v in found.items()}


def runs_on(archs: Dict[str, List[int]], capability: int) -> bool:
    """Whether a GPU of compute ``capability`` (times ten) can run code from ``archs``
    (:func:`cuda_archs`): SASS of its own major version and not newer, or PTX not newer."""
    return (any(a // 10 == capability // 10 and a <= capability for a in archs["sass"])
            or any(a <= capability for a in archs["ptx"]))


def gpu_failure_message(ctx, error: str, capability: Optional[int],
                        archs: Optional[Dict[str, List[int]]], version: str) -> str:
    """Why MXNet ``version`` failed its first operation on the GPU ``ctx`` with ``error``,
    given the GPU's ``capability`` and the library's ``archs`` (either None if unknown)."""
    msg = f"MXNet {version} cannot compute on {ctx}: {error}."
    if capability is None or archs is None:
        return msg
    def names(v):
        return ", ".join(f"sm_{a}" for a in v) or "none"
    msg += (f" This GPU is sm_{capability}; the MXNet library has machine code for "
            f"{names(archs['sass'])} and PTX for {names(archs['ptx'])}.")
    if not runs_on(archs, capability):
        msg += (" None of that runs on this GPU. MXNet 1.9.1's CUDA wheels (mxnet-cu1xx) "
                "end at Ampere (sm_86) with no PTX, so Hopper (H100, H200) and newer GPUs need "
                "an MXNet built from source for their architecture; meanwhile use the CPU.")
    return msg


def check_gpu(ctx) -> None:
    """Raise a ``RuntimeError`` that says why, where MXNet cannot compute on the GPU ``ctx``
    (tried on a two-element array); nothing for a CPU context. MXNet's own error would come
    later, from the first layer, and not name the cause."""
    if ctx.device_type != "gpu":
        return
    import mxnet as mx

    try:
        (mx.nd.ones((2,), ctx=ctx) * 2).asnumpy()
        return
    except mx.MXNetError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        error = lines[-1].rstrip(".") if lines else type(err).__name__
    capability = archs = None
    try:
        from mxnet.libinfo import find_lib_path

        capability = mx.util.get_cuda_compute_capability(ctx)
        archs = cuda_archs(find_lib_path()[0])
    except Exception:   # noqa: BLE001  (the explanation is best effort; the error stands)
        pass
    raise RuntimeError(gpu_failure_message(ctx, error, capability, archs, mx.__version__))


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

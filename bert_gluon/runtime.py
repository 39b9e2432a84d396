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
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)

"""Which GPUs can an MXNet build compute on? The GPU code in its ``libmxnet.so`` (or in the
one inside a wheel), read with :func:`bert_gluon.runtime.cuda_archs`, and the verdict for
each GPU generation asked about.

    python -m pip download --no-deps mxnet-cu117==1.9.1 -d /tmp/mxwhl
    python benchmarks/mxnet_gpu_archs.py /tmp/mxwhl/mxnet_cu117-1.9.1-*.whl --gpu 80 86 90

Without a path: the MXNet installed here. Prints a JSON list, one entry per library.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bert_gluon.runtime import cuda_archs, runs_on  # noqa: E402

GENERATIONS = {70: "Volta", 75: "Turing", 80: "Ampere A100", 86: "Ampere RTX 30",
               89: "Ada", 90: "Hopper H100/H200", 100: "Blackwell B200", 120: "Blackwell RTX 50"}


def library_archs(path: str) -> dict:
    """:func:`cuda_archs` of a ``.so``, or of ``mxnet/libmxnet.so`` inside a wheel."""
    if not path.endswith(".whl"):
        return cuda_archs(path)
    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
        member = "mxnet/libmxnet.so"
        if member not in z.namelist():
            raise SystemExit(f"{path}: no {member} in this wheel")
        with z.open(member) as src, open(os.path.join(tmp, "libmxnet.so"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        return cuda_archs(os.path.join(tmp, "libmxnet.so"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="libmxnet.so files or MXNet wheels "
                                            "(default: the installed MXNet)")
    p.add_argument("--gpu", type=int, nargs="+", default=sorted(GENERATIONS),
                   help="compute capabilities times ten to judge (default: %(default)s)")
    args = p.parse_args()
    paths = args.paths
    if not paths:
        import importlib.util

        spec = importlib.util.find_spec("mxnet")
        paths = [os.path.join(os.path.dirname(spec.origin), "libmxnet.so")]
    rows = []
    for path in paths:
        archs = library_archs(path)
        verdict = {f"sm_{c} ({GENERATIONS.get(c, '?')})": runs_on(archs, c) for c in args.gpu}
        rows.append({"library": os.path.basename(path), **archs, "runs_on": verdict})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

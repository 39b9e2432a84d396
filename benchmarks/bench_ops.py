"""Each compiled CPU operator (``bert_gluon/csrc``) against MXNet's own operators for the same
work, forward only, at one shape: the first thing to run on a new kind of CPU.

    .venv/bin/python benchmarks/bench_ops.py --out benchmarks/results/ops_amd_avx2.json

The attention core (``bg_self_attention`` vs ``interleaved_matmul_selfatt_qk`` + softmax +
``_valatt``) and the residual LayerNorm (``bg_add_norm`` vs ``x + y`` then ``LayerNorm``), with
the QKV ``FullyConnected`` of the same rows for scale; milliseconds per call, best of
``--repeats`` loops of ``--calls`` calls. On 2026-12-02 this found the attention kernel 4x
slower than MXNet's own on an AVX2 CPU (its vectors were AVX-512 wide; ``csrc/gemm.h``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bert_gluon  # noqa: E402  (OMP threads before mxnet)
import mxnet as mx  # noqa: E402

from bert_gluon import ops  # noqa: E402
from bert_gluon.config import PRESETS  # noqa: E402


def best_ms(fn: Callable[[], mx.nd.NDArray], calls: int, repeats: int) -> float:
    fn().wait_to_read()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            out = fn()
        out.wait_to_read()
        best = min(best, (time.perf_counter() - tic) / calls)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="minilm_l6", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args()
    if not ops.load():
        raise SystemExit(f"the compiled operators are unavailable: {ops._state['error']}")

    cfg = PRESETS[args.shape]
    T, B, H, U = args.length, args.batch_size, cfg.num_heads, cfg.units
    nd = mx.nd
    qkv = nd.random.normal(shape=(T, B, 3 * U))
    length = nd.full((B,), T)
    predict = nd.ones((1,))    # mode 1: inference, no dropout
    x, y = nd.random.normal(shape=(T * B, U)), nd.random.normal(shape=(T * B, U))
    gamma, beta = nd.ones((U,)), nd.zeros((U,))
    w = nd.random.normal(shape=(3 * U, U))

    def mx_attention():
        weights = nd.softmax(nd.contrib.interleaved_matmul_selfatt_qk(qkv, heads=H), axis=-1)
        return nd.contrib.interleaved_matmul_selfatt_valatt(qkv, weights, heads=H)

    cases: Dict[str, Dict[str, Callable]] = {
        "attention": {
            "mxnet": mx_attention,
            "bert_gluon": lambda: nd.bg_self_attention(qkv, length, predict, heads=H,
                                                       dropout=0.0)[0]},
        "add_norm": {
            "mxnet": lambda: nd.LayerNorm(x + y, gamma, beta, axis=-1, eps=1e-12),
            "bert_gluon": lambda: nd.bg_add_norm(x, y, gamma, beta, predict, eps=1e-12,
                                                 dropout=0.0)[0]},
        "qkv_fully_connected": {
            "mxnet": lambda: nd.FullyConnected(x, w, no_bias=True, num_hidden=3 * U)},
    }
    diff = float(nd.abs(cases["attention"]["mxnet"]() - cases["attention"]["bert_gluon"]())
                 .max().asscalar())
    result = {"command": " ".join([os.path.relpath(sys.executable)] + sys.argv),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cpu": bert_gluon.runtime.cpu_description(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "shape": args.shape,
              "batch_size": B, "length": T, "attention_max_abs_diff": diff, "ms": {}}
    print(f"{result['cpu']}, OMP_NUM_THREADS={result['omp_num_threads']}, {args.shape} "
          f"{B} x {T}; attention max |difference| {diff:.1e}")
    for name, impls in cases.items():
        result["ms"][name] = {k: round(best_ms(fn, args.calls, args.repeats), 3)
                              for k, fn in impls.items()}
        row = "   ".join(f"{k} {v:8.2f} ms" for k, v in result["ms"][name].items())
        print(f"{name:20s} {row}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

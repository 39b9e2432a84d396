"""Where our encoder's inference time goes on the MRPC workload of ``bench_encoder.py``.

Runs MXNet's profiler (aggregate statistics) over a few passes of the bucketed MRPC batches
and prints each operator's share of the time and FullyConnected's GFLOP/s, then times the
hybridization variants that could matter for batches whose shape changes every step
(``static_alloc`` with and without ``static_shape``, and oneDNN's subgraph fusion), alternating.

    python benchmarks/profile_mrpc.py --shape minilm_l6 --mrpc-examples 96
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_encoder as B  # noqa: E402  (imports bert_gluon: all cores for OpenMP)
import mxnet as mx  # noqa: E402

from bert_gluon import BERTConfig  # noqa: E402


def profile(cfg: BERTConfig, batches, passes: int) -> dict:
    cand = B.MXNetCandidate(B.ours_model(cfg, "alloc"), "ours")
    cand.load(batches)
    cand.run(False)
    mx.profiler.set_config(profile_imperative=True, profile_symbolic=True, aggregate_stats=True,
                           filename=os.devnull)
    mx.profiler.set_state("run")
    t = time.perf_counter()
    for _ in range(passes):
        cand.run(False)
    seconds = (time.perf_counter() - t) / passes
    mx.profiler.set_state("stop")
    stats = json.loads(mx.profiler.dumps(format="json"))["Time"]["operator"]
    mx.profiler.dumps(reset=True)
    op_ms = {name: v["Total"] / passes for name, v in stats.items()}
    total = sum(op_ms.values())
    return {"seconds_per_pass": seconds, "operator_ms_per_pass": op_ms,
            "share": {k: v / total for k, v in op_ms.items()},
            "fc_gflops": B.forward_flops(cfg, batches, attention=False)
            / (op_ms.get("FullyConnected", 0) / 1e3) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="minilm_l6")
    p.add_argument("--mrpc-examples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", default=os.environ.get("BERT_VOCAB") or os.path.join(
        B.ROOT, "..", "shared", "data", "vocab", "bert-base-uncased-vocab.txt"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "profile_mrpc.json"))
    args = p.parse_args()

    cfg = BERTConfig.preset(args.shape)
    batches = B.mrpc_batches(args.mrpc_examples, args.batch_size, "bucketed", args.vocab)
    prof = profile(cfg, batches, args.passes)
    print(f"{args.shape}, {args.mrpc_examples} MRPC pairs in {len(batches)} bucketed batches: "
          f"{prof['seconds_per_pass']:.3f} s per inference pass")
    for name, share in sorted(prof["share"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {name:24s} {100 * share:5.1f} %  {prof['operator_ms_per_pass'][name]:7.1f} ms")
    print(f"  FullyConnected at {prof['fc_gflops']:.0f} GFLOP/s")

    cands = [B.MXNetCandidate(B.ours_model(cfg, mode), mode)
             for mode in ("static", "alloc", "onednn")]
    times = B.time_alternating(cands, batches, False, args.repeats)
    seq_per_s = {k: args.mrpc_examples / statistics.median(v) for k, v in times.items()}
    print("inference seq/s by hybridization: " + ", ".join(
        f"{k} {v:.1f}" for k, v in seq_per_s.items()) +
        "  (static = static_alloc+static_shape, alloc = static_alloc, onednn = static + MKLDNN "
        "backend)")
    result = dict(vars(args), batches=len(batches), profile=prof, hybridization_seq_per_s=seq_per_s,
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

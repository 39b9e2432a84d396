"""Where our encoder's inference time goes on the MRPC workload of ``bench_encoder.py``.

Runs MXNet's profiler (aggregate statistics) over a few passes of the bucketed MRPC batches,
for our encoder and for GluonNLP's, and prints each operator's share of the time,
FullyConnected's GFLOP/s and the most ours could gain over GluonNLP outside the dense layers
(GluonNLP's operator time over our FullyConnected time: both run the same oneDNN GEMMs), then
times the hybridization variants that could matter for batches whose shape changes every
step (``static_alloc`` with and without ``static_shape``, and oneDNN's subgraph fusion),
alternating.

    python benchmarks/profile_mrpc.py --shape bert_base --passes 2 --repeats 3 \
        --out benchmarks/results/amd_avx512/profile_mrpc_bert_base.json
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
from bert_gluon.fileio import write_json  # noqa: E402


def profile(net, cfg: BERTConfig, batches, passes: int) -> dict:
    """Operator times (MXNet's profiler, aggregate) of ``passes`` inference passes of ``net``."""
    cand = B.MXNetCandidate(net, "profiled")
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
            "operator_ms_per_pass_total": total,
            "share": {k: v / total for k, v in op_ms.items()},
            "fc_gflops": B.forward_flops(cfg, batches, attention=False)
            / (op_ms.get("FullyConnected", 0) / 1e3) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="minilm_l6")
    p.add_argument("--mrpc-examples", type=int, default=256)
    p.add_argument("--mrpc-pool", type=int, default=None,
                   help="bucket this many random train pairs (default all: batches of "
                        "--batch-size; = --mrpc-examples: small batches, as bench_encoder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", default=os.environ.get("BERT_VOCAB") or os.path.join(
        B.ROOT, "..", "shared", "data", "vocab", "bert-base-uncased-vocab.txt"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "profile_mrpc.json"))
    args = p.parse_args()

    cfg = BERTConfig.preset(args.shape)
    batches = B.mrpc_batches(args.mrpc_examples, args.batch_size, "bucketed", args.vocab,
                             pool=args.mrpc_pool)
    print(f"{args.shape}, {args.mrpc_examples} MRPC pairs in {len(batches)} bucketed batches "
          f"of {sorted({len(b[2]) for b in batches})} pairs")
    profiles = {"ours": profile(B.ours_model(cfg, "alloc"), cfg, batches, args.passes),
                "gluonnlp": profile(B.gluonnlp_model(cfg), cfg, batches, args.passes)}
    for name, prof in profiles.items():
        print(f"{name}: {prof['seconds_per_pass']:.3f} s per inference pass, "
              f"{prof['operator_ms_per_pass_total']:.0f} ms in operators")
        for op, share in sorted(prof["share"].items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {op:42s} {100 * share:5.1f} %  {prof['operator_ms_per_pass'][op]:8.1f} ms")
        print(f"  FullyConnected at {prof['fc_gflops']:.0f} GFLOP/s")
    # the most any speed-up outside the dense layers can give us: GluonNLP's operator time
    # against our FullyConnected time alone (the same oneDNN GEMMs in both)
    ceiling = (profiles["gluonnlp"]["operator_ms_per_pass_total"]
               / profiles["ours"]["operator_ms_per_pass"]["FullyConnected"])
    now = (profiles["gluonnlp"]["operator_ms_per_pass_total"]
           / profiles["ours"]["operator_ms_per_pass_total"])
    print(f"in operator time ours is {now:.2f}x GluonNLP; with every operator but "
          f"FullyConnected free it would be {ceiling:.2f}x")

    cands = [B.MXNetCandidate(B.ours_model(cfg, mode), mode)
             for mode in ("static", "alloc", "onednn")]
    times = B.time_alternating(cands, batches, False, args.repeats)
    seq_per_s = {k: args.mrpc_examples / statistics.median(v) for k, v in times.items()}
    print("inference seq/s by hybridization: " + ", ".join(
        f"{k} {v:.1f}" for k, v in seq_per_s.items()) +
        "  (static = static_alloc+static_shape, alloc = static_alloc, onednn = static + MKLDNN "
        "backend)")
    result = dict(vars(args), batches=len(batches), profile=profiles["ours"],
                  profile_gluonnlp=profiles["gluonnlp"], fc_only_ceiling_over_gluonnlp=ceiling,
                  hybridization_seq_per_s=seq_per_s,
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, result)          # atomic, as every result file


if __name__ == "__main__":
    main()

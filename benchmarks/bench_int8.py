"""INT8 and bfloat16 vs fp32 inference of a fine-tuned classifier: speed and MRPC dev accuracy.

    python benchmarks/bench_int8.py --checkpoint runs/mrpc/best

1. Load the fine-tuned checkpoint (``bert-gluon finetune`` writes ``<output_dir>/best``).
2. Quantize it with each of ``--backends`` (:func:`bert_gluon.quantization.quantize_checkpoint_model`):
   ``bert_gluon`` (AMX tiles or AVX-512 VNNI, no calibration) and ``onednn`` (calibrated on
   ``--calib-examples`` random training pairs: the package's transform + bucketed loader).
   Default: both where the CPU has AMX INT8 or AVX-512 VNNI, else onednn; and ``bf16``
   (:func:`bert_gluon.quantization.bf16_dense_layers`: the same dense layers in bfloat16)
   where the CPU has AVX-512 BF16.
3. Score the dev set with every model through :func:`bert_gluon.finetuning.predict_scores`
   (the same bucketed batches ``bert-gluon evaluate`` uses): accuracy and F1.
4. Time them, alternating in one process, median of ``--repeats`` passes: over the dev set
   (bucketed, batch ``--batch-size``) and over one fixed batch 32 x 128.
5. The ceiling: the model's dense layers alone (its four GEMM shapes at 32 x 128 rows), fp32
   ``FullyConnected`` against each backend's kernel (oneDNN's ``quantized_fully_connected``
   on int8 data; ``bg_int8_dense`` on float32 data, its own quantization included;
   ``FullyConnected`` on bfloat16 with the casts in and out), alternating. Their share of the
   fp32 pass and their speed-up bound the whole pass (Amdahl), if nothing else got faster.

Writes ``benchmarks/results/int8_<time>.json`` and prints one table.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bert_gluon  # noqa: E402  (OMP threads before mxnet)
from bert_gluon import PRESETS, BERTClassifier, BERTConfig  # noqa: E402
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402


def newest_checkpoint(root: str = os.path.join(ROOT, "runs")) -> Optional[str]:
    """The most recent ``runs/*/best`` folder, if any."""
    found = glob.glob(os.path.join(root, "*", "best", "config.json"))
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def time_alternating(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    for fn in fns.values():          # warm-up: graph build and oneDNN primitives per shape
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def dense_layer_ceiling(cfg: BERTConfig, rows: int, repeats: int,
                        backends: Sequence[str]) -> Dict:
    """Seconds per pass of the encoder's dense layers at ``rows`` tokens, fp32 and INT8.

    Per layer: the fused QKV projection (units -> 3 units), the attention output (units ->
    units) and the two feed-forward layers (units -> hidden -> units), each timed alone on
    random data (oneDNN: s8 inputs and weights, as the quantized graph feeds them; bert_gluon:
    float32 inputs, packed int8 weights; bf16: float32 inputs cast to bfloat16, the output
    cast back, as :func:`bert_gluon.quantization.bf16_dense_layers` does)."""
    from bert_gluon.quantization import pack_int8_weight
    from bert_gluon.runtime import BFLOAT16

    rng = np.random.RandomState(0)
    C, H = cfg.units, cfg.hidden_size
    shapes = [(C, 3 * C), (C, C), (C, H), (H, C)]
    fns: Dict[str, Callable[[], None]] = {}
    lo, hi = mx.nd.array([-1.0]), mx.nd.array([1.0])
    for k, n in shapes:
        x8 = mx.nd.array(rng.randint(-127, 128, (rows, k)), dtype="int8")
        w8 = mx.nd.array(rng.randint(-127, 128, (n, k)), dtype="int8")
        b8 = mx.nd.array(rng.randint(-127, 128, (n,)), dtype="int8")
        x, w, b = (a.astype("float32") for a in (x8, w8, b8))
        fns[f"fp32 {k}->{n}"] = (lambda x=x, w=w, b=b, n=n: mx.nd.FullyConnected(
            x, w, b, num_hidden=n).wait_to_read())
        if "onednn" in backends:
            fns[f"onednn {k}->{n}"] = (lambda x=x8, w=w8, b=b8, n=n: mx.nd.contrib
                                       .quantized_fully_connected(x, w, b, lo, hi, lo, hi, lo,
                                                                  hi, num_hidden=n)[0]
                                       .wait_to_read())
        if "bert_gluon" in backends:
            packed, scale = pack_int8_weight(w.asnumpy())
            wp, ws = mx.nd.array(packed, dtype="int8"), mx.nd.array(scale)
            fns[f"bert_gluon {k}->{n}"] = (lambda x=x, w=wp, s=ws, b=b, n=n, k=k: mx.nd
                                           .bg_int8_dense(x, w, s, b, num_hidden=n, in_units=k)
                                           .wait_to_read())
        if "bf16" in backends:
            wb, bb = (mx.nd.amp_cast(a, dtype=BFLOAT16) for a in (w, b))
            fns[f"bf16 {k}->{n}"] = (lambda x=x, w=wb, b=bb, n=n: mx.nd.amp_cast(
                mx.nd.FullyConnected(mx.nd.amp_cast(x, dtype=BFLOAT16), w, b, num_hidden=n),
                dtype="float32").wait_to_read())
    med = {k: statistics.median(v) for k, v in time_alternating(fns, repeats).items()}
    fp32 = cfg.num_layers * sum(med[f"fp32 {k}->{n}"] for k, n in shapes)
    out: Dict = {"rows": rows, "fp32_s": fp32}
    for be in backends:
        low = cfg.num_layers * sum(med[f"{be} {k}->{n}"] for k, n in shapes)
        out[be] = {"seconds": low, "over_fp32": fp32 / low,
                   "over_fp32_per_shape": {f"{k}->{n}": med[f"fp32 {k}->{n}"]
                                           / med[f"{be} {k}->{n}"] for k, n in shapes}}
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    from bert_gluon.checkpoints import from_pretrained
    from bert_gluon.data import BERTDatasetTransform, load_task, transform_examples
    from bert_gluon.fileio import write_json
    from bert_gluon.finetuning import classification_metrics, predict_scores
    from bert_gluon.quantization import (bf16_dense_layers, fast_int8_kernel,
                                         quantize_checkpoint_model)
    from bert_gluon.runtime import fast_bf16

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="fine-tuned checkpoint folder (default: newest runs/*/best)")
    p.add_argument("--task", default=None, help="task of the dev set (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backends", nargs="+", choices=["bert_gluon", "onednn", "bf16"],
                   default=(["bert_gluon", "onednn"] if fast_int8_kernel() else ["onednn"])
                   + (["bf16"] if fast_bf16() else []),
                   help="INT8 backends (bert_gluon, onednn) and bfloat16 (bf16) to measure "
                        "(default: both INT8 ones where the CPU has AMX INT8 or AVX-512 VNNI, "
                        "else onednn; bf16 where it has AVX-512 BF16)")
    p.add_argument("--calib-examples", type=int, default=320, help="onednn calibration pairs")
    p.add_argument("--calib-mode", default="naive", choices=["naive", "entropy"])
    p.add_argument("--granularity", default="tensor-wise", choices=["tensor-wise", "channel-wise"],
                   help="INT8 weight scales per layer or per output unit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shape", default=None, choices=sorted(PRESETS),
                   help="speed only: a randomly initialized classifier of this shape instead of "
                        "a checkpoint (calibrated on MRPC; its dev 'accuracy' means nothing)")
    p.add_argument("--vocab", default=os.environ.get("BERT_VOCAB") or os.path.join(
        ROOT, "..", "shared", "data", "vocab", "bert-base-uncased-vocab.txt"))
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="accuracy only: skip the timing passes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    ctx = mx.cpu()
    if args.shape:
        from bert_gluon.tokenization import Tokenizer

        ckpt = f"random {args.shape}"
        model = BERTClassifier(BERTConfig.preset(args.shape), num_classes=2)
        model.initialize(ctx=ctx)
        tokenizer = Tokenizer.from_file(args.vocab)
        meta = {"task": "mrpc", "class_labels": ["0", "1"], "max_len": 128, "pair": True}
    else:
        ckpt = args.checkpoint or newest_checkpoint()
        if not ckpt or not os.path.isfile(os.path.join(ckpt, "config.json")):
            p.error(f"no fine-tuned checkpoint at {ckpt!r}: run `bert-gluon finetune` first or "
                    f"pass --checkpoint")
        model, tokenizer = from_pretrained(ckpt, task="classifier", ctx=ctx)
        meta = getattr(model, "meta", {}) or {}
    labels = meta.get("class_labels")
    task = args.task or meta.get("task")
    if not labels or not task:
        p.error(f"{ckpt}: config.json lacks class_labels/task (not a fine-tuned classifier?)")
    model.hybridize(static_alloc=True, static_shape=True)
    transform = BERTDatasetTransform(tokenizer, int(meta.get("max_len", 128)), labels,
                                     pad=False, pair=bool(meta.get("pair", True)))
    nets = {"fp32": model}
    quantize_s = {}
    for be in args.backends:
        t = time.perf_counter()
        options = (dict(num_examples=args.calib_examples, batch_size=args.batch_size,
                        calib_mode=args.calib_mode, granularity=args.granularity)
                   if be == "onednn" else {})
        nets[be] = (bf16_dense_layers(model) if be == "bf16" else quantize_checkpoint_model(
            model, tokenizer, dict(meta, task=task), data_dir=args.data_dir, backend=be,
            **options))
        quantize_s[be] = time.perf_counter() - t
    low_names = list(args.backends)           # the low-precision variants: INT8 and bf16
    title = {be: be if be == "bf16" else "int8 " + be for be in low_names}

    dev = transform_examples(load_task(task, "dev", args.data_dir), transform, "dev")
    gold = np.array([int(s[3]) for s in dev])
    result: Dict = {"checkpoint": ckpt if args.shape else os.path.relpath(ckpt, ROOT),
                    "task": task,
                    "command": " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
                    "omp_num_threads": int(os.environ["OMP_NUM_THREADS"]),
                    "cpu": bert_gluon.runtime.cpu_description(),
                    "load_avg_at_start": os.getloadavg(), "calib_examples": args.calib_examples,
                    "calib_mode": args.calib_mode, "granularity": args.granularity,
                    "backends": low_names, "quantize_seconds": quantize_s,
                    "dev_examples": len(dev), "metrics": {}, "agreement": {}, "speed": {}}
    preds = {}
    for name, net in nets.items():
        scores = predict_scores(net, dev, tokenizer.pad_id, ctx, args.batch_size)
        result["metrics"][name] = classification_metrics(gold, scores.argmax(1))
        preds[name] = scores.argmax(1)
    for name in low_names:
        result["agreement"][name] = float((preds[name] == preds["fp32"]).mean())

    rng = np.random.RandomState(0)
    words = mx.nd.array(rng.randint(1000, tokenizer.vocab.__len__(), size=(32, 128)))
    segments = mx.nd.array((np.arange(128) >= 64)[None, :].repeat(32, 0))
    valid = mx.nd.full((32,), 128)
    workloads = {
        "dev set (bucketed)": (len(dev), {
            n: (lambda net=net: predict_scores(net, dev, tokenizer.pad_id, ctx, args.batch_size))
            for n, net in nets.items()}),
        "batch 32 x 128": (32, {
            n: (lambda net=net: net(words, segments, valid).wait_to_read())
            for n, net in nets.items()}),
    }
    for wname, (nseq, fns) in (workloads.items() if args.speed else ()):
        times = time_alternating(fns, args.repeats)
        result["speed"][wname] = {n: {"times_s": ts, "seq_per_s": nseq / statistics.median(ts)}
                                  for n, ts in times.items()}
        for name in low_names:
            r = result["speed"][wname]
            r[name]["over_fp32"] = r[name]["seq_per_s"] / r["fp32"]["seq_per_s"]
    if args.speed:
        ceiling = dense_layer_ceiling(model.config, 32 * 128, max(args.repeats, 5), low_names)
        fp32_pass = 1.0 / result["speed"]["batch 32 x 128"]["fp32"]["seq_per_s"] * 32
        ceiling["share_of_fp32_pass"] = ceiling["fp32_s"] / fp32_pass
        for name in low_names:
            ceiling[name]["bound_over_fp32"] = fp32_pass / (
                fp32_pass - ceiling["fp32_s"] + ceiling[name]["seconds"])
        result["dense_layers_32x128"] = ceiling
    result["load_avg_at_end"] = os.getloadavg()

    how = ", ".join(f"{be} {quantize_s[be]:.1f} s" + (
        f" (calibrated on {args.calib_examples} train pairs, {args.calib_mode}, "
        f"{args.granularity})" if be == "onednn" else "") for be in low_names)
    print(f"checkpoint {result['checkpoint']}  ({task} dev, {len(dev)} examples; quantized: "
          f"{how})")
    print(f"{'':22s} {'fp32':>10s}" + "".join(f" {title[be]:>22s}" for be in low_names))
    for m in ("accuracy", "f1"):
        print(f"{'dev ' + m:22s} {result['metrics']['fp32'][m]:10.4f}"
              + "".join(f" {result['metrics'][be][m]:22.4f}" for be in low_names))
    print(f"{'same prediction':22s} {'':10s}"
          + "".join(f" {result['agreement'][be]:22.4f}" for be in low_names))
    for wname, r in result["speed"].items():
        print(f"{wname + ' seq/s':22s} {r['fp32']['seq_per_s']:10.2f}" + "".join(
            f" {r[be]['seq_per_s']:14.2f} (x{r[be]['over_fp32']:.2f})" for be in low_names))
    if "dense_layers_32x128" in result:
        c = result["dense_layers_32x128"]
        print(f"dense layers alone at 32 x 128: {100 * c['share_of_fp32_pass']:.0f} % of the "
              f"fp32 pass")
        for be in low_names:
            shapes = ", ".join(f"{k} x{v:.2f}"
                               for k, v in c[be]["over_fp32_per_shape"].items())
            kind = "bf16" if be == "bf16" else "INT8"
            print(f"  {be}: {kind} x{c[be]['over_fp32']:.2f} over fp32 ({shapes}), so {kind} "
                  f"dense layers alone can give at most x{c[be]['bound_over_fp32']:.2f}"
                  + (" (not counting the GELU it fuses)" if be == "bert_gluon" else ""))
    print(f"(median of {args.repeats} alternating passes, OMP_NUM_THREADS="
          f"{result['omp_num_threads']}, load average {result['load_avg_at_start'][0]:.1f} -> "
          f"{result['load_avg_at_end'][0]:.1f})")
    out = args.out or os.path.join(HERE, "results",
                                   time.strftime("int8_%Y%m%d_%H%M%S.json", time.gmtime()))
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""Acceptance run: pre-train ``BERTConfig.preset("small")`` from scratch on the Gutenberg books
minus three held out, within a wall-time budget, then evaluate on the held-out books
(``--corpus wikitext``: train on WikiText-2 valid, evaluate on WikiText-2 test; ``--corpus both``:
train on the books and WikiText-2 valid together -- each kept as its own data folder, so a
random next sentence comes from the same corpus -- and evaluate on WikiText-2 test).

    nice -n 5 nohup .venv/bin/python benchmarks/pretrain_small.py --minutes 25 \\
        > runs/pretrain_small.out 2>&1 &

Steps (all through the library: ``bert_gluon.pretraining_data`` / ``bert_gluon.pretraining``):

1. static pre-training data for the training books and for the held-out books
   (``create_pretraining_data``, 2 worker processes; cached under ``runs/pretrain_small/``);
2. the learning rate warms up and decays linearly over ``--max-steps`` or the time budget,
   whichever ends first (the CPU is shared with other jobs, so steps/second varies);
3. ``pretrain`` with ``max_seconds`` = the budget (checkpoints every 200 steps, metrics log
   ``runs/pretrain_small/train/metrics.jsonl``, final checkpoint ``.../train/final``);
4. evaluation on (at most ``--eval-pairs``) held-out pairs: MLM accuracy, NSP accuracy,
   and two baselines: always predicting the most frequent masked token of the training data,
   and NSP from the words A and B share (``word_overlap_nsp_baseline``, threshold fitted on
   the training pairs). ``--baselines-only`` computes just the baselines of the data the
   options name, into ``benchmarks/results/pretrain_small_baselines.json``.

The summary goes to ``benchmarks/results/pretrain_small.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bert_gluon  # noqa: E402  (sets OMP_NUM_THREADS before mxnet)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from bert_gluon import BERTConfig  # noqa: E402
from bert_gluon.fileio import write_json  # noqa: E402
from bert_gluon.pretraining import (baselines, build_pretraining_model,  # noqa: E402
                                    evaluate, pretrain)
from bert_gluon.pretraining_data import (PretrainingData, create_pretraining_data,  # noqa: E402
                                         load_shards)
from bert_gluon.tokenization import Tokenizer  # noqa: E402

HELD_OUT = ("christmas-carol.txt", "time-machine.txt", "heart-of-darkness.txt")


def shared(env: str, name: str) -> str:
    return os.environ.get(env) or os.path.join(ROOT, "..", "shared", "data", name)


def make_data(files, out, tok, args, dupe_factor: int = 1) -> dict:
    if os.path.exists(os.path.join(out, "meta.json")):
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    return create_pretraining_data(files, out, tok, max_seq_length=args.seq_len,
                                   max_predictions_per_seq=args.max_predictions,
                                   num_workers=2, seed=args.seed, dupe_factor=dupe_factor)


def nsp_curve(metrics_path: str, window: int = 200) -> list:
    """NSP on the training pairs and on the held-out pairs as training went on: one row per
    periodic evaluation (256 held-out pairs) with the mean training NSP accuracy of the
    ``window`` steps before it. A widening gap is the model learning its training documents
    rather than the general test (see the README)."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["event"] == "train"]
    curve = []
    for e in (r for r in rows if r["event"] == "eval"):
        recent = [t["nsp_acc"] for t in train if e["step"] - window < t["step"] <= e["step"]]
        curve.append({"step": e["step"], "held_out_nsp_acc": round(e["nsp_acc"], 4),
                      "held_out_nsp_loss": round(e["nsp_loss"], 4),
                      "train_nsp_acc": round(sum(recent) / len(recent), 4) if recent else None})
    return curve


def corpus_files(corpus: str):
    """``(train files, held-out files)`` of the acceptance corpus (``both``: the books'
    training files; :func:`main` adds WikiText-2 valid as a second data folder)."""
    if corpus == "wikitext":
        folder = shared("WIKITEXT2_DIR", "wikitext-2")
        return [os.path.join(folder, "wiki.valid.tokens")], [os.path.join(folder, "wiki.test.tokens")]
    books = sorted(glob.glob(os.path.join(shared("GUTENBERG_DIR", "gutenberg"), "*.txt")))
    train_files = [b for b in books if os.path.basename(b) not in HELD_OUT]
    eval_files = [b for b in books if os.path.basename(b) in HELD_OUT]
    assert len(eval_files) == 3, eval_files
    if corpus == "both":
        return train_files, corpus_files("wikitext")[1]
    return train_files, eval_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=25.0, help="training wall-time budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=3000,
                   help="schedule length in steps (the time budget usually ends it first)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-predictions", type=int, default=20)
    p.add_argument("--eval-pairs", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "bertadam", "lamb"])
    p.add_argument("--bf16", action="store_true",
                   help="the encoder's dense layers in bfloat16 (CPUs with AVX-512 BF16)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="evaluate an exponential moving average of the weights (e.g. 0.999)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="decoupled weight decay of weight matrices and embeddings")
    p.add_argument("--preset", default="small", help="BERTConfig preset of the model")
    for flag, field in (("--units", "units"), ("--layers", "num_layers"),
                        ("--heads", "num_heads"), ("--ffn", "hidden_size")):
        p.add_argument(flag, dest=field, type=int, default=None,
                       help=f"override the preset's {field}")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout and attention dropout (default: the preset's 0.1). MLM is far "
                   "from overfitting in minutes; NSP learns the few training documents within the "
                   "budget with or without dropout (the result's nsp_curve)")
    p.add_argument("--corpus", default="gutenberg", choices=["gutenberg", "wikitext", "both"],
                   help="Gutenberg books minus 3 held out, or WikiText-2 valid (test held out), "
                        "or both (the books once, WikiText-2 valid --dupe-factor times)")
    p.add_argument("--dupe-factor", type=int, default=1,
                   help="passes over the training text, each with new pairs and masks")
    p.add_argument("--note", default="", help="conditions of the run, kept in the result")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "pretrain_small"))
    p.add_argument("--run-name", default="train", help="folder under --out for this run")
    p.add_argument("--result", default=os.path.join(HERE, "results", "pretrain_small.json"))
    p.add_argument("--baselines-only", action="store_true",
                   help="no training: the baselines of this data, into "
                        "results/pretrain_small_baselines.json")
    args = p.parse_args()

    vocab = os.environ.get("BERT_VOCAB") or os.path.join(shared("", "vocab"),
                                                          "bert-base-uncased-vocab.txt")
    train_files, eval_files = corpus_files(args.corpus)
    tok = Tokenizer.from_file(vocab)

    t0 = time.time()
    suffix = f"L{args.seq_len}P{args.max_predictions}"
    if args.corpus != "gutenberg":
        suffix = f"wikitext_{suffix}"
    dupe = f"D{args.dupe_factor}" if args.dupe_factor != 1 else ""
    if args.corpus == "both":   # the books once, WikiText-2 valid --dupe-factor times
        parts = [(train_files, f"data_train_L{args.seq_len}P{args.max_predictions}", 1),
                 (corpus_files("wikitext")[0], f"data_train_{suffix}{dupe}", args.dupe_factor)]
        train_files = parts[0][0] + parts[1][0]
    else:
        parts = [(train_files, f"data_train_{suffix}{dupe}", args.dupe_factor)]
    train_dirs = [os.path.join(args.out, name) for _, name, _ in parts]
    eval_dir = os.path.join(args.out, f"data_eval_{suffix}")
    train_metas = [make_data(files, d, tok, args, n) for (files, _, n), d in zip(parts, train_dirs)]
    eval_meta = make_data(eval_files, eval_dir, tok, args)
    train_pairs = sum(m["stats"]["instances"] for m in train_metas)
    print(f"data: {train_pairs} train pairs, "
          f"{eval_meta['stats']['instances']} held-out pairs ({time.time() - t0:.0f} s)",
          flush=True)

    folders = [PretrainingData.from_shards(d, tok) for d in train_dirs]   # checks the vocab
    train = folders[0]
    if len(folders) > 1:   # --corpus both: each folder was masked when written; join them
        train = PretrainingData({k: np.concatenate([f.arrays[k] for f in folders])
                                 for k in train.arrays}, train.masking)
    eval_all, _ = load_shards(eval_dir)
    eval_arrays = {k: v[:args.eval_pairs] for k, v in eval_all.items()}
    eval_small = {k: v[:256] for k, v in eval_all.items()}
    base = baselines(train.arrays, eval_arrays)
    if args.baselines_only:
        path = os.path.join(HERE, "results", "pretrain_small_baselines.json")
        table = {}
        if os.path.exists(path):
            with open(path) as f:
                table = json.load(f)
        table[f"{'+'.join(map(os.path.basename, train_dirs))} -> {os.path.basename(eval_dir)}"] = dict(
            base, held_out_pairs_evaluated=int(len(eval_arrays["valid_length"])),
            command=".venv/bin/python benchmarks/pretrain_small.py " + " ".join(sys.argv[1:]))
        write_json(path, table)
        print(json.dumps(table, indent=2))
        return
    overrides = {} if args.dropout is None else dict(dropout=args.dropout,
                                                     attention_dropout=args.dropout)
    overrides.update({k: getattr(args, k) for k in ("units", "num_layers", "num_heads",
                                                    "hidden_size") if getattr(args, k)})
    if args.seq_len > BERTConfig.preset(args.preset).max_length:
        overrides["max_length"] = args.seq_len   # position table long enough for --seq-len
    config = BERTConfig.preset(args.preset, vocab_size=len(tok), **overrides)

    # the schedule: warm-up then linear decay over --max-steps, or ending at the time budget
    # if the machine is slower than that (pretrain's max_seconds); another job shares the CPU
    budget = args.minutes * 60
    total_steps = args.max_steps
    model, _ = build_pretraining_model(config, seed=args.seed)
    run_dir = os.path.join(args.out, args.run_name)
    summary = pretrain(model, train, run_dir, eval_arrays=eval_small, tokenizer=tok,
                       batch_size=args.batch_size, total_steps=total_steps,
                       learning_rate=args.lr, warmup_ratio=args.warmup_ratio, seed=args.seed,
                       optimizer=args.optimizer, weight_decay=args.weight_decay, bf16=args.bf16,
                       ema_decay=args.ema_decay,
                       checkpoint_every=200, eval_every=200, log_every=20,
                       max_seconds=budget, progress=True)
    final = evaluate(model, eval_arrays, ctx=mx.cpu())
    baseline = base["baseline_most_frequent_token"]
    result = {
        "command": ".venv/bin/python benchmarks/pretrain_small.py " + " ".join(sys.argv[1:]),
        "model": dict(preset=args.preset, **config.to_dict()),
        "corpus": args.corpus,
        "train_books": [os.path.basename(b) for b in train_files],
        "held_out_books": [os.path.basename(b) for b in eval_files],
        "data": {"train_pairs": train_pairs,
                 "held_out_pairs_evaluated": int(len(eval_arrays["valid_length"])),
                 "dupe_factor": args.dupe_factor, "max_seq_length": args.seq_len,
                 "max_predictions_per_seq": args.max_predictions},
        "hyper": {"batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
                  "optimizer": args.optimizer, "weight_decay": args.weight_decay, "seed": args.seed, "bf16": args.bf16,
                  "ema_decay": args.ema_decay,
                  "total_steps_planned": total_steps, "minutes_budget": args.minutes},
        "steps": summary["steps"], "stopped": summary["stopped"],
        "train_seconds": round(summary["train_seconds"], 1),
        "tokens_seen": summary["tokens_seen"],
        "tokens_per_second": round(summary["tokens_per_second"], 1),
        "held_out": final,
        **base,
        "mlm_acc_over_baseline": final["mlm_acc"] / max(baseline["mlm_acc"], 1e-9),
        "targets": {"nsp_acc>=0.75": final["nsp_acc"] >= 0.75,
                    "mlm_acc>=2x_baseline": final["mlm_acc"] >= 2 * baseline["mlm_acc"]},
        "machine": {"cpu_cores": os.cpu_count(), "cpu": bert_gluon.runtime.cpu_description(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                    "python": platform.python_version(), "mxnet": mx.__version__,
                    "load_average_at_end": os.getloadavg(), "note": args.note},
        "nsp_curve": nsp_curve(os.path.join(run_dir, "metrics.jsonl")),
        "metrics_log": os.path.relpath(os.path.join(run_dir, "metrics.jsonl"), ROOT),
        "final_checkpoint": os.path.relpath(os.path.join(run_dir, "final"), ROOT),
    }
    write_json(args.result, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

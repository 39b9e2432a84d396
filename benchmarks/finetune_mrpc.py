"""Benchmark: fine-tune all-MiniLM-L6-v2 on MRPC with bert_gluon and with Hugging Face
transformers (torch CPU), same recipe, same machine, alternating runs.

Three sides (``--impls``): ``ours``; ``hf``, transformers' model in a plain torch loop; and
``trainer``, the same model trained by transformers' ``Trainer`` (needs ``accelerate``), the
way most transformers users run this recipe. ``ours_bf16`` is ours with the encoder's dense
layers in bfloat16 (``finetune --bf16``: mixed precision, for CPUs with AVX-512 BF16).
``ours_mean`` is ours with ``pooling="mean"``: the classifier reads the mean of the last layer
over the real tokens (the pooling all-MiniLM-L6-v2 was trained with) instead of BERT's
``[CLS]`` pooler, the head of every other side.

Recipe: MRPC train (3668 pairs), 3 epochs, batch 32, max length 128, lr 5e-5, linear warmup
over 10 % of the updates then linear decay, weight decay 0.01 (none on bias/LayerNorm),
gradient clipping at 1.0, dropout 0.1, seeds 1, 2, 3. All sides use 2 threads, dynamic padding,
and report the dev accuracy / F1 of the model after the last epoch and the wall time of the
training loop (tokenization and dev evaluation excluded).

    .venv/bin/python benchmarks/finetune_mrpc.py              # the full benchmark (~55 min)
    .venv/bin/python benchmarks/finetune_mrpc.py --seeds 1 --epochs 1 --max-train 256 \
        --out /tmp/smoke/finetune_smoke.json                                             # smoke

Each run is a separate process (MXNet and torch do not share a process) and writes
``benchmarks/results/finetune_mrpc_runs/<impl>-seed<N>.json``. ``--pairs-in-parallel`` runs
the sides of one seed *at the same time* (each with 2 threads) instead of one
after the other: on a machine shared with other jobs both then see the same load.
``--collect`` only summarizes the run files. The summary goes to
``benchmarks/results/finetune_mrpc.json`` and a table is printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREADS = 2


def run_ours(a: argparse.Namespace, bf16: bool = False, pooling: str = "cls") -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    sys.path.insert(0, ROOT)
    import bert_gluon  # noqa: F401  (threads before mxnet)
    from bert_gluon.finetuning import FinetuneArgs, finetune

    # kept (runs/ is not committed): bench_int8.py --checkpoint runs/finetune_mrpc/ours-seedN/best;
    # named after --out, so a smoke run with its own --out leaves the benchmark's checkpoints be
    name = os.path.splitext(os.path.basename(a.out))[0]
    out = os.path.join(ROOT, "runs", name, f"{a.only}-seed{a.seed}")
    shutil.rmtree(out, ignore_errors=True)
    s = finetune(FinetuneArgs(task="mrpc", model="all-MiniLM-L6-v2", output_dir=out,
                              epochs=a.epochs, batch_size=32, max_len=128, lr=5e-5,
                              warmup_ratio=0.1, weight_decay=0.01, optimizer=a.optimizer,
                              seed=a.seed, bf16=bf16, pooling=pooling,
                              max_train_examples=a.max_train, progress=False))
    last = s["last_dev"]
    return {"accuracy": last["accuracy"], "f1": last["f1"], "train_time": s["train_time"],
            "best_epoch": s["best_epoch"], "best_accuracy": s["dev"]["accuracy"],
            "output_dir": os.path.relpath(out, ROOT)}


def _hf_setup(a: argparse.Namespace):
    """Seeded tokenizer, sequence classifier and tokenized MRPC for both transformers sides."""
    import random

    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

    sys.path.insert(0, ROOT)
    from bert_gluon.checkpoints import minilm_dir
    from bert_gluon.data import load_task

    torch.set_num_threads(THREADS)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)           # the classifier head's initialization
    folder = minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2)

    def encode(rows):
        return [dict(tok(r[0], r[1], truncation=True, max_length=128), labels=int(r[2]))
                for r in rows]

    rows = load_task("mrpc", "train")
    train = encode(rows[:a.max_train] if a.max_train else rows)
    dev = encode(load_task("mrpc", "dev"))
    return model, train, dev, DataCollatorWithPadding(tok)


def _hf_metrics(labels, preds) -> dict:
    from bert_gluon.finetuning import classification_metrics

    m = classification_metrics(labels, preds)
    return {"accuracy": m["accuracy"], "f1": m["f1"]}


def run_hf(a: argparse.Namespace) -> dict:
    """transformers model, a plain torch training loop (what a script writer would write)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    model, train, dev, collate = _hf_setup(a)
    g = torch.Generator().manual_seed(a.seed)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate, generator=g)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not any(k in n for k in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters()
                          if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=5e-5)
    total = len(loader) * a.epochs
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    model.train()
    tic = time.time()
    for _ in range(a.epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    train_time = time.time() - tic
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(dev, batch_size=64, collate_fn=collate):
            preds += model(**{k: v for k, v in batch.items() if k != "labels"}
                           ).logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    return dict(_hf_metrics(labels, preds), train_time=train_time)


def run_trainer(a: argparse.Namespace) -> dict:
    """transformers model trained by transformers' own ``Trainer`` (needs ``accelerate``):
    the same recipe through its defaults (AdamW, linear schedule, clipping at 1.0)."""
    import dataclasses
    import tempfile

    from transformers import Trainer, TrainingArguments

    model, train, dev, collate = _hf_setup(a)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in names else {"warmup_steps": 0.1}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, num_train_epochs=a.epochs, learning_rate=5e-5,
                                 per_device_train_batch_size=32, per_device_eval_batch_size=64,
                                 weight_decay=0.01, max_grad_norm=1.0, seed=a.seed, use_cpu=True,
                                 save_strategy="no", logging_strategy="no", report_to=[],
                                 disable_tqdm=True, **warmup)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
        tic = time.time()
        trainer.train()
        train_time = time.time() - tic
        out = trainer.predict(dev)
    return dict(_hf_metrics(out.label_ids, out.predictions.argmax(-1)), train_time=train_time)


RUNNERS = {"ours": run_ours, "ours_bf16": lambda a: run_ours(a, bf16=True),
           "ours_mean": lambda a: run_ours(a, pooling="mean"), "hf": run_hf,
           "trainer": run_trainer}
NAMES = {"ours": "bert_gluon (MXNet)", "ours_bf16": "bert_gluon (MXNet), bf16 dense layers",
         "ours_mean": "bert_gluon (MXNet), mean-pooled head",
         "hf": "transformers (torch), plain loop", "trainer": "transformers (torch), Trainer"}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for k in ("mxnet", "gluonnlp", "torch", "transformers", "accelerate"):
        try:
            out[k] = version(k)
        except PackageNotFoundError:
            pass
    return out


def _stats(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train", type=int, default=None, help="first N train pairs (smoke)")
    p.add_argument("--impls", nargs="+", choices=list(RUNNERS),
                   default=["ours", "hf", "trainer"],
                   help="which sides to run (trainer needs `pip install accelerate`)")
    p.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pairs-in-parallel", action="store_true",
                   help="run the sides of one seed at the same time")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "bertadam"],
                   help="ours: bias-corrected AdamW (as torch) or BERT's uncorrected BERTAdam")
    p.add_argument("--collect", action="store_true", help="only summarize existing run files")
    p.add_argument("--runs-dir", default=None,
                   help="folder of the per-run files (default: finetune_mrpc_runs/ beside --out, "
                        "shared by every run written there)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "finetune_mrpc.json"))
    a = p.parse_args()
    if a.only:  # child process: one run, written to the runs folder
        result = RUNNERS[a.only](a)
        result.update(impl=a.only, seed=a.seed, epochs=a.epochs, max_train=a.max_train,
                      optimizer=a.optimizer if a.only.startswith("ours") else "torch AdamW",
                      versions=_versions())
        runs_dir = a.runs_dir or os.path.join(os.path.dirname(a.out), "finetune_mrpc_runs")
        os.makedirs(runs_dir, exist_ok=True)
        with open(os.path.join(runs_dir, f"{a.only}-seed{a.seed}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result))
        return

    runs_dir = a.runs_dir or os.path.join(os.path.dirname(a.out), "finetune_mrpc_runs")
    os.makedirs(runs_dir, exist_ok=True)
    if "trainer" in a.impls and not a.collect and importlib.util.find_spec("accelerate") is None:
        raise SystemExit("--impls trainer needs accelerate (pip install -e '.[bench]'), "
                         "or leave it out: --impls ours hf")
    if not a.collect:
        for seed in a.seeds:
            procs = []
            for impl in a.impls:
                cmd = [sys.executable, __file__, "--only", impl, "--seed", str(seed),
                       "--epochs", str(a.epochs), "--optimizer", a.optimizer, "--out", a.out,
                       "--runs-dir", runs_dir]
                if a.max_train:
                    cmd += ["--max-train", str(a.max_train)]
                env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
                log = open(os.path.join(runs_dir, f"{impl}-seed{seed}.log"), "w")
                procs.append((impl, subprocess.Popen(cmd, env=env, stdout=log,
                                                     stderr=subprocess.STDOUT)))
                if not a.pairs_in_parallel:
                    procs[-1][1].wait()
            for impl, proc in procs:
                if proc.wait():
                    raise SystemExit(f"{impl} seed {seed} failed: see {runs_dir}")
    runs = []
    for seed in a.seeds:
        for impl in a.impls:
            path = os.path.join(runs_dir, f"{impl}-seed{seed}.json")
            if not os.path.exists(path):
                print(f"{impl:7s} seed {seed}: no result ({path})")
                continue
            with open(path) as f:
                r = json.load(f)
            runs.append(r)
            print(f"{impl:7s} seed {seed}: acc {100 * r['accuracy']:.2f}  f1 {100 * r['f1']:.2f}  "
                  f"train {r['train_time']:.0f}s", flush=True)

    table = {}
    for impl in a.impls:
        rs = [r for r in runs if r["impl"] == impl]
        if rs:
            table[impl] = {k: _stats([r[k] for r in rs]) for k in ("accuracy", "f1", "train_time")}
            table[impl]["seeds"] = [r["seed"] for r in rs]
    print("\n| implementation | dev accuracy % | dev F1 % | training wall time s | seeds |")
    print("|---|---|---|---|---|")
    for impl in a.impls:
        if impl not in table:
            continue
        t = table[impl]
        print(f"| {NAMES[impl]} | {100 * t['accuracy'][0]:.1f} ± {100 * t['accuracy'][1]:.1f} "
              f"| {100 * t['f1'][0]:.1f} ± {100 * t['f1'][1]:.1f} "
              f"| {t['train_time'][0]:.0f} ± {t['train_time'][1]:.0f} | {t['seeds']} |")
    import platform

    from bert_gluon.runtime import cpu_description

    record = {"recipe": {"model": "all-MiniLM-L6-v2", "task": "mrpc", "epochs": a.epochs,
                         "batch_size": 32, "max_len": 128, "lr": 5e-5, "warmup_ratio": 0.1,
                         "weight_decay": 0.01, "optimizer": a.optimizer, "seeds": a.seeds,
                         "max_train": a.max_train,
                         "threads": THREADS, "pairs_in_parallel": a.pairs_in_parallel},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "cpu": cpu_description()},
              "runs": runs, "summary": table}
    record["versions"] = _versions()
    with open(a.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()

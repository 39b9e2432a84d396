"""``bert-gluon`` command line: a thin layer over the library's functions.

Each sub-command parses its arguments and calls one library function; all the work
(and its docstrings) lives in the modules.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


# --- demo -------------------------------------------------------------------------------
def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="build the tutorial's blocks and print their output shapes")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import shapes_demo

    shapes_demo()
    return 0


# --- pretrained weights (owner: checkpoints) --------------------------------------------
def _add_weights_commands(sub) -> None:
    for name, formats, help_ in (
            ("convert", ("ours", "huggingface", "gluonnlp"),
             "turn a model-zoo name, HF folder, 'minilm' or our folder into a checkpoint folder"),
            ("export", ("symbol",), "HybridBlock.export a model for deployment "
                                    "(model-symbol.json + model-0000.params + vocab.txt)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("source", help="bert_12_768_12 / bert_24_1024_16, all-MiniLM-L6-v2 "
                                      "(minilm), a Hugging Face folder or one of ours")
        p.add_argument("output_dir")
        if len(formats) > 1:
            p.add_argument("--to", default=formats[0], choices=formats,
                           help="output format (default: %(default)s)")
        p.add_argument("--task", default="model", choices=["model", "pretraining", "classifier"])
        p.add_argument("--num-classes", type=int, default=None,
                       help="classifier classes (default: the checkpoint's head, else 2)")
        p.add_argument("--dataset-name", default=None,
                       help="GluonNLP vocabulary/corpus, e.g. book_corpus_wiki_en_uncased")
        p.add_argument("--root", default=None, help="MXNet model cache (default $MXNET_HOME/models)")
        if name == "export":
            p.add_argument("--seq-len", type=int, default=128, help="traced sequence length")
        p.set_defaults(func=_cmd_convert, to=formats[0])


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, convert

    kwargs = {k: v for k, v in (("dataset_name", args.dataset_name), ("root", args.root),
                                ("num_classes", args.num_classes)) if v is not None}
    try:
        paths = convert(args.source, args.output_dir, to=args.to, task=args.task,
                        seq_len=getattr(args, "seq_len", 128), **kwargs)
    except CheckpointError as e:            # a bad or missing checkpoint: one line, no traceback
        print(f"bert-gluon {args.command}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


# --- fine-tuning: finetune, evaluate, predict (owner: finetuning) -----------------------
def _add_finetuning_commands(sub) -> None:
    from .finetuning import DEFAULT_MODEL, FinetuneArgs

    d = FinetuneArgs()
    p = sub.add_parser("finetune", help="fine-tune a pretrained BERT on a task or TSV/CSV files")
    p.add_argument("--task", default=None,
                   help="built-in task: mrpc or sst-2 (default: mrpc unless --train-file)")
    p.add_argument("--data-dir", help="folder with the task's train/dev/test.tsv "
                                      "(default: $MRPC_DIR / $SST2_DIR, ../shared/data, cache)")
    p.add_argument("--train-file", help="a TSV/CSV training file (instead of a task's)")
    p.add_argument("--dev-file", help="a TSV/CSV development file")
    p.add_argument("--text-columns", nargs="+", metavar="COL",
                   help="one or two text columns (header names or 0-based indices)")
    p.add_argument("--label-column", help="label column (header name or 0-based index)")
    p.add_argument("--class-labels", nargs="+", metavar="LABEL", help="the label values")
    p.add_argument("--regression", action="store_true", help="float labels, one output")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint folder")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<task>)")
    for name, typ in (("epochs", int), ("batch_size", int), ("max_len", int), ("lr", float),
                      ("warmup_ratio", float), ("weight_decay", float), ("adam_epsilon", float),
                      ("max_grad_norm", float),
                      ("accumulate", int), ("seed", int), ("num_buckets", int),
                      ("log_interval", int), ("early_stopping", int),
                      ("max_train_examples", int), ("max_dev_examples", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name),
                       help=f"(default: {getattr(d, name)})")
    p.add_argument("--optimizer", default=d.optimizer, choices=["bertadam", "adamw", "lamb", "adam"])
    p.add_argument("--pooling", default=None, choices=["cls", "mean"],
                   help="what the classifier reads: cls = tanh(Dense) of [CLS], BERT's head "
                   "(default; a checkpoint of ours keeps its own); mean = the mean of the last "
                   "layer over the real tokens, sentence-transformers' pooling")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/last")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows")
    p.add_argument("--no-amp", action="store_true", help="no fp16 on GPU")
    p.add_argument("--bf16", action="store_true", help="CPU mixed precision: the encoder's "
                   "dense layers in bfloat16, float32 weights (fast with AVX-512 BF16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy and F1 of a fine-tuned checkpoint")
    p.add_argument("checkpoint", help="folder written by finetune (e.g. runs/mrpc/best)")
    p.add_argument("--task", help="task (default: the checkpoint's)")
    p.add_argument("--split", default="dev", choices=["train", "dev"])
    p.add_argument("--file", help="a labelled TSV/CSV file instead of a task split")
    p.add_argument("--data-dir")
    p.add_argument("--predictions", help="write label/probability per example to this TSV")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-bad", action="store_true")
    _add_precision_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="label and probability for sentences or a file")
    p.add_argument("checkpoint", help="folder written by finetune (e.g. runs/mrpc/best)")
    p.add_argument("sentences", nargs="*", help="one sentence, or a pair for pair tasks")
    p.add_argument("--file", help="TSV/CSV file of inputs (the checkpoint's text columns)")
    p.add_argument("--text-columns", nargs="+", metavar="COL")
    p.add_argument("--output", help="write predictions to this TSV")
    p.add_argument("--data-dir", help="folder of the task's files (for --int8 calibration)")
    _add_precision_args(p)
    p.set_defaults(func=_cmd_predict)


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    low = p.add_mutually_exclusive_group()
    low.add_argument("--int8", action="store_true", help="INT8 inference on CPU")
    low.add_argument("--bf16", action="store_true", help="bfloat16 dense layers on CPU "
                     "(fast where the CPU has AVX-512 BF16: AMD Zen 4, Intel Cooper Lake on)")
    p.add_argument("--int8-backend", default="auto", choices=["auto", "bert_gluon", "onednn"],
                   help="bert_gluon: bert_gluon's INT8 operator (AMX tiles or AVX-512 VNNI), no "
                   "calibration; onednn: MXNet's oneDNN, calibrated on 320 training examples; "
                   "auto (default): bert_gluon where the CPU has AMX or VNNI, else onednn")
    p.add_argument("--calib-file", help="training TSV/CSV to calibrate --int8-backend onednn "
                   "on (default: the checkpoint's task)")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetuning import FinetuneArgs, finetune

    task = args.task or (None if args.train_file else "mrpc")
    fields = {k: v for k, v in vars(args).items() if k in FinetuneArgs.__dataclass_fields__}
    fields.update(task=task, amp=not args.no_amp, progress=not args.no_progress,
                  output_dir=args.output_dir or os.path.join("runs", task or "custom"))
    summary = finetune(FinetuneArgs(**fields))
    dev = summary["dev"] or {}
    print(f"best epoch {summary['best_epoch']}: dev "
          + ", ".join(f"{k}={v:.4f}" for k, v in dev.items() if k != "n")
          + f"; training {summary['train_time']:.0f}s; checkpoint {summary['checkpoint']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .finetuning import evaluate

    metrics = evaluate(args.checkpoint, task=args.task, split=args.split, file=args.file,
                       data_dir=args.data_dir, predictions=args.predictions,
                       batch_size=args.batch_size, skip_bad=args.skip_bad, int8=args.int8,
                       calib_file=args.calib_file, int8_backend=args.int8_backend,
                       bf16=args.bf16)
    print(json.dumps(metrics, sort_keys=True))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .finetuning import predict, predict_file

    precision = dict(int8=args.int8, calib_file=args.calib_file, data_dir=args.data_dir,
                     int8_backend=args.int8_backend, bf16=args.bf16)
    if args.file:
        rows = predict_file(args.checkpoint, args.file, args.output, args.text_columns,
                            **precision)
    elif args.sentences:
        rows = predict(args.checkpoint, [tuple(args.sentences)], **precision)
    else:
        print("predict: give sentences or --file", file=sys.stderr)
        return 2
    for r in rows:
        prob = "" if r["probability"] is None else f"\t{r['probability']:.4f}"
        print(f"{r['label']}{prob}")
    return 0


# --- pre-training: create-pretraining-data, pretrain (owner: pretraining) --------------
def _add_pretraining_commands(sub) -> None:
    p = sub.add_parser("create-pretraining-data",
                       help="raw text -> masked-LM/next-sentence pairs in .npz shards (static)")
    p.add_argument("inputs", nargs="+", help="text files or folders (WikiText, one sentence "
                   "per line with blank lines between documents, or Gutenberg books)")
    p.add_argument("--output", required=True, help="folder for shard-*.npz and meta.json")
    p.add_argument("--vocab", default=None, help="vocab.txt (default $BERT_VOCAB or "
                   "../shared/data/vocab/bert-base-uncased-vocab.txt)")
    p.add_argument("--layout", default="auto", choices=["auto", "wikitext", "lines", "gutenberg"])
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--masked-lm-prob", type=float, default=0.15)
    p.add_argument("--max-predictions-per-seq", type=int, default=20)
    p.add_argument("--whole-word-masking", action="store_true")
    p.add_argument("--dupe-factor", type=int, default=1, help="passes over the text, each "
                   "masked differently")
    p.add_argument("--num-workers", type=int, default=1, help="worker processes")
    p.add_argument("--num-shards", type=int, default=None, help="default: --num-workers")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--errors", default="skip", choices=["skip", "strict"],
                   help="lines that are not UTF-8: skip and count, or stop with file:line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_create_pretraining_data)

    p = sub.add_parser("pretrain", help="pre-train BERT (masked LM + next sentence)")
    p.add_argument("--data", required=True, help="folder made by create-pretraining-data")
    p.add_argument("--output-dir", required=True, help="checkpoint/, metrics.jsonl, final/")
    p.add_argument("--eval-data", default=None, help="held-out folder made the same way")
    p.add_argument("--max-eval-pairs", type=int, default=2048)
    p.add_argument("--vocab", default=None, help="vocab.txt of the data (not with --init-from)")
    p.add_argument("--preset", default="small", help="model shape from scratch (BERTConfig.preset)")
    p.add_argument("--config", dest="config_path", default=None, help="BERTConfig JSON instead")
    p.add_argument("--init-from", default=None, help="continue from pretrained weights, e.g. "
                   "all-MiniLM-L6-v2 or a save_pretrained folder (fresh MLM/NSP heads if absent)")
    p.add_argument("--dynamic-masking", action="store_true", help="re-mask every epoch")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per device and worker")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--steps", dest="total_steps", type=int, default=10000)
    p.add_argument("--lr", dest="learning_rate", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.01)
    p.add_argument("--optimizer", default="bertadam", choices=["bertadam", "adamw", "lamb", "adam"])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) "
                   "after this much wall time")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint")
    p.add_argument("--gpus", default=None, help="e.g. 0,1 (kvstore 'device' all-reduces)")
    p.add_argument("--kvstore", default="device", help="'device', or 'dist_sync' for several "
                   "machines (launch: docs/pretraining.md)")
    p.add_argument("--fp16", action="store_true", help="AMP fp16 with loss scaling (GPU)")
    p.add_argument("--bf16", action="store_true", help="CPU mixed precision: the encoder's "
                   "dense layers in bfloat16 (fast with AVX-512 BF16)")
    p.add_argument("--ema-decay", type=float, default=None, help="evaluate and save an "
                   "exponential moving average of the weights, e.g. 0.999")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("evaluate-pretraining",
                       help="MLM and NSP accuracy of a pre-trained checkpoint on held-out data")
    p.add_argument("checkpoint", help="a pretrain run's final/ folder (or save_pretrained)")
    p.add_argument("--data", required=True, help="held-out folder made by "
                   "create-pretraining-data")
    p.add_argument("--train-data", default=None, help="the folder it was trained on: also the "
                   "most-frequent-token and word-overlap NSP baselines")
    p.add_argument("--max-pairs", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_evaluate_pretraining)


def _cmd_create_pretraining_data(args: argparse.Namespace) -> int:
    import json

    from .pretraining import default_vocab
    from .pretraining_data import create_pretraining_data
    from .tokenization import Tokenizer

    meta = create_pretraining_data(
        args.inputs, args.output, Tokenizer.from_file(args.vocab or default_vocab()),
        max_seq_length=args.max_seq_length, short_seq_prob=args.short_seq_prob,
        masked_lm_prob=args.masked_lm_prob, max_predictions_per_seq=args.max_predictions_per_seq,
        whole_word_masking=args.whole_word_masking, dupe_factor=args.dupe_factor,
        num_shards=args.num_shards, num_workers=args.num_workers, seed=args.seed,
        layout=args.layout, errors=args.errors, progress=not args.no_progress)
    print(json.dumps({k: meta[k] for k in ("stats", "seconds", "tokens_per_second", "shards")}))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import json

    from .pretraining import run_pretraining

    summary = run_pretraining(
        args.data, args.output_dir, eval_data=args.eval_data, vocab=args.vocab,
        preset=args.preset, config_path=args.config_path, init_from=args.init_from,
        dynamic_masking=args.dynamic_masking, max_eval_pairs=args.max_eval_pairs,
        gpus=[int(g) for g in args.gpus.split(",")] if args.gpus else None, fp16=args.fp16,
        bf16=args.bf16, seed=args.seed, batch_size=args.batch_size, accumulate=args.accumulate,
        total_steps=args.total_steps, learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio, optimizer=args.optimizer,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
        log_every=args.log_every, stop_after=args.stop_after,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None, resume=args.resume,
        kvstore=args.kvstore, ema_decay=args.ema_decay, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _cmd_evaluate_pretraining(args: argparse.Namespace) -> int:
    import json

    from .pretraining import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.train_data,
                                         args.max_pairs, args.batch_size)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert-gluon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_command(sub)
    _add_weights_commands(sub)
    _add_finetuning_commands(sub)
    _add_pretraining_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of static pre-training data creation (tokens/s) with 1 and 2 worker processes.

    nice -n 5 .venv/bin/python benchmarks/pretraining_data_throughput.py [--books 12]

Runs ``create_pretraining_data`` (read + strip + sentence-split + WordPiece + pairs +
masking + shard writing) on the first ``--books`` Gutenberg books (sorted by name) with
``num_workers`` = 1 and 2 (same shards, so the same output), ``--repeats`` times each,
alternating, and reports the best wall time per setting as input WordPiece tokens per
second. Writes ``benchmarks/results/pretraining_data_throughput.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bert_gluon  # noqa: E402,F401
from bert_gluon.fileio import write_json  # noqa: E402
from bert_gluon.pretraining import default_vocab  # noqa: E402
from bert_gluon.pretraining_data import create_pretraining_data  # noqa: E402
from bert_gluon.tokenization import Tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--books", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--out", default=os.path.join(HERE, "results",
                                                 "pretraining_data_throughput.json"))
    args = p.parse_args()
    gdir = os.environ.get("GUTENBERG_DIR") or os.path.join(ROOT, "..", "shared", "data",
                                                           "gutenberg")
    books = sorted(glob.glob(os.path.join(gdir, "*.txt")))[:args.books]
    tok = Tokenizer.from_file(default_vocab())
    workers = [int(w) for w in args.workers.split(",")]
    runs = {w: [] for w in workers}
    tmp = tempfile.mkdtemp(prefix="ptdata-")
    try:
        for r in range(args.repeats):
            for w in workers:
                out = os.path.join(tmp, f"w{w}-r{r}")
                t0 = time.time()
                meta = create_pretraining_data(books, out, tok, max_seq_length=128,
                                               num_workers=w, num_shards=max(workers),
                                               progress=False)
                seconds = time.time() - t0
                runs[w].append({"seconds": round(seconds, 2), "tokens": meta["stats"]["tokens"],
                                "instances": meta["stats"]["instances"]})
                print(f"workers={w} repeat={r}: {seconds:.1f} s, "
                      f"{meta['stats']['tokens'] / seconds:,.0f} tokens/s", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {w: min(x["seconds"] for x in runs[w]) for w in workers}
    tokens = runs[workers[0]][0]["tokens"]
    result = {
        "command": ".venv/bin/python benchmarks/pretraining_data_throughput.py "
                   + " ".join(sys.argv[1:]),
        "books": [os.path.basename(b) for b in books], "input_wordpiece_tokens": tokens,
        "settings": "max_seq_length=128, masked_lm_prob=0.15, max_predictions_per_seq=20, "
                    "dupe_factor=1, shards=" + str(max(workers)),
        "runs": {str(w): runs[w] for w in workers},
        "tokens_per_second_best": {str(w): round(tokens / best[w], 1) for w in workers},
        "speedup_2_vs_1": round(best[workers[0]] / best[workers[-1]], 3),
        "machine": {"cpu_cores": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }
    write_json(args.out, result)
    print(json.dumps(result["tokens_per_second_best"]), result["speedup_2_vs_1"])


if __name__ == "__main__":
    main()

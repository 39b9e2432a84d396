"""Several machines through MXNet's distributed kvstore, simulated on this one.

1 scheduler + 1 server + 2 workers, all on 127.0.0.1, run ``bert-gluon pretrain --kvstore
dist_sync`` on a tiny configuration for a few steps. Each worker reads its own half of the
data; gradients are summed by the server, so both workers must end with bit-identical
parameters, and the loss must go down. Every process is killed at the end, whatever happens.
"""
import json
import os
import socket
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from bert_gluon.cli import main as cli_main
from conftest import write_toy_corpus, write_toy_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(tmp_path):
    return (write_toy_corpus(tmp_path / "corpus.txt", num_docs=16, stride=61, spread=25,
                             lines=(4, 9), words=(5, 12)),
            write_toy_vocab(tmp_path / "vocab.txt"))


@pytest.mark.skipif(not mx.runtime.Features().is_enabled("DIST_KVSTORE"),
                    reason="this MXNet build has no distributed kvstore (DIST_KVSTORE)")
def test_dist_sync_two_workers_end_identical(tmp_path):
    corpus, vocab = _corpus(tmp_path)
    data = str(tmp_path / "data")
    assert cli_main(["create-pretraining-data", corpus, "--output", data, "--vocab", vocab,
                     "--max-seq-length", "32", "--max-predictions-per-seq", "5",
                     "--dupe-factor", "2", "--no-progress"]) == 0
    out = str(tmp_path / "run")
    env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(_free_port()),
               DMLC_NUM_SERVER="1", DMLC_NUM_WORKER="2", DMLC_NODE_HOST="127.0.0.1",
               DMLC_INTERFACE="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    serve = [sys.executable, "-c", "import mxnet"]   # importing MXNet runs the role's loop
    work = [sys.executable, "-m", "bert_gluon.cli", "pretrain", "--data", data, "--output-dir",
            out, "--vocab", vocab, "--preset", "tiny", "--kvstore", "dist_sync",
            "--batch-size", "4", "--steps", str(STEPS), "--lr", "2e-3", "--warmup-ratio", "0",
            "--log-every", "1", "--checkpoint-every", "100", "--no-progress", "--seed", "3"]
    procs = []
    try:
        for role, cmd in [("scheduler", serve), ("server", serve), ("worker", work),
                          ("worker", work)]:
            log = open(tmp_path / f"{role}-{len(procs)}.log", "w")
            procs.append(subprocess.Popen(cmd, env=dict(env, DMLC_ROLE=role), cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT))
        for p in procs[2:]:
            p.wait(timeout=240)
        for p in procs[:2]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {f: (tmp_path / f).read_text() for f in os.listdir(tmp_path) if f.endswith(".log")}
    assert [p.returncode for p in procs[2:]] == [0, 0], logs

    params = [mx.nd.load(os.path.join(out, f"worker-{r}", "checkpoint", "model.params"))
              for r in (0, 1)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert np.array_equal(params[0][name].asnumpy(), params[1][name].asnumpy()), name

    for rank in (0, 1):
        records = [json.loads(line) for line in
                   open(os.path.join(out, f"worker-{rank}", "metrics.jsonl"))]
        start = next(r for r in records if r["event"] == "start")
        assert (start["rank"], start["num_workers"]) == (rank, 2)
        train = [r for r in records if r["event"] == "train"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        # each worker saw its own shard: half of all the pairs per step
        assert start["pairs_per_worker_epoch"] * 2 <= start["pairs_total"]
        first = np.mean([r["mlm_loss"] + r["nsp_loss"] for r in train[:2]])
        last = np.mean([r["mlm_loss"] + r["nsp_loss"] for r in train[-2:]])
        assert last < first, (rank, first, last)

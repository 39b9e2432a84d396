"""End to end through the console entry point: fine-tune all-MiniLM-L6-v2 on a slice of MRPC,
then evaluate the saved checkpoint and predict with it."""
import json
import os

import pytest

from bert_gluon.cli import main
from conftest import data_dir

MRPC = data_dir("MRPC_DIR", "mrpc")
try:
    from bert_gluon.checkpoints import minilm_dir

    MINILM = minilm_dir()
except Exception as e:  # noqa: BLE001  (the package is installed by run.sh)
    MINILM, WHY = None, str(e)
pytestmark = [
    pytest.mark.skipif(MINILM is None, reason="all-MiniLM-L6-v2 package not installed"),
    pytest.mark.skipif(not os.path.isfile(os.path.join(MRPC, "train.tsv")),
                       reason=f"no MRPC files in {MRPC}"),
]


def test_finetune_evaluate_predict_minilm(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["finetune", "--task", "mrpc", "--data-dir", MRPC, "--output-dir", str(out),
               "--max-train-examples", "64", "--max-dev-examples", "64", "--max-len", "64",
               "--batch-size", "16", "--num-buckets", "2", "--epochs", "3",
               "--log-interval", "1", "--seed", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best epoch" in printed and "dev accuracy=" in printed

    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    per_epoch = len(losses) // 3                            # bucketed: >= 4 updates per epoch
    assert len(losses) == 3 * per_epoch and per_epoch >= 4
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / per_epoch < sum(first) / per_epoch - 0.02   # the loss falls
    summary = json.load(open(out / "summary.json"))
    dev = [r for r in log if r["event"] == "dev"]
    assert len(dev) == 3 and summary["dev"]["accuracy"] == max(r["accuracy"] for r in dev)

    # evaluate reloads the best checkpoint to the same metrics (same 64 dev pairs)
    dev64 = tmp_path / "dev64.tsv"
    with open(os.path.join(MRPC, "dev.tsv"), encoding="utf-8-sig") as f:
        dev64.write_text("".join(f.readlines()[:65]), encoding="utf-8")
    preds = tmp_path / "preds.tsv"
    assert main(["evaluate", str(out / "best"), "--file", str(dev64), "--predictions",
                 str(preds)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 64
    assert metrics["accuracy"] == summary["dev"]["accuracy"]
    assert metrics["f1"] == pytest.approx(summary["dev"]["f1"])
    assert len(preds.read_text().splitlines()) == 65

    # predict: a pair on the command line, and a file
    assert main(["predict", str(out / "best"), "The cat sat on the mat .",
                 "A cat was sitting on the mat ."]) == 0
    label, prob = capsys.readouterr().out.strip().split("\t")
    assert label in ("0", "1") and 0.5 <= float(prob) <= 1.0
    out_tsv = tmp_path / "p.tsv"
    assert main(["predict", str(out / "best"), "--file", str(dev64), "--output",
                 str(out_tsv)]) == 0
    assert len(out_tsv.read_text().splitlines()) == 65

    # --int8: the same checkpoint quantized (calibrated on MRPC train pairs) agrees with fp32
    preds8 = tmp_path / "preds8.tsv"
    assert main(["evaluate", str(out / "best"), "--file", str(dev64), "--predictions",
                 str(preds8), "--int8", "--data-dir", MRPC]) == 0
    metrics8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics8["n"] == 64 and abs(metrics8["accuracy"] - metrics["accuracy"]) <= 0.05
    fp32_rows = [r.split("\t") for r in preds.read_text().splitlines()[1:]]
    int8_rows = [r.split("\t") for r in preds8.read_text().splitlines()[1:]]
    same = sum(a[0] == b[0] for a, b in zip(fp32_rows, int8_rows))
    assert same >= 60, f"INT8 changed {64 - same} of 64 labels"
    assert max(abs(float(a[1]) - float(b[1])) for a, b in zip(fp32_rows, int8_rows)) < 0.1
    assert main(["predict", str(out / "best"), "The cat sat on the mat .",
                 "A cat was sitting on the mat .", "--int8", "--data-dir", MRPC]) == 0
    label8, prob8 = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
    def p_one(lab, p):   # probability of class "1" (the labels may flip near 0.5)
        return float(p) if lab == "1" else 1.0 - float(p)

    assert abs(p_one(label8, prob8) - p_one(label, prob)) < 0.05, (label, prob, label8, prob8)

    # --bf16: the encoder's dense layers in bfloat16 give the fp32 labels and nearly its
    # probabilities; where MXNet cannot run bfloat16 here, the error says so
    from bert_gluon.runtime import bf16_supported

    preds16 = tmp_path / "preds16.tsv"
    args16 = ["evaluate", str(out / "best"), "--file", str(dev64), "--predictions",
              str(preds16), "--bf16"]
    if not bf16_supported():
        with pytest.raises(RuntimeError, match="bfloat16"):
            main(args16)
        return
    assert main(args16) == 0
    metrics16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics16["n"] == 64 and abs(metrics16["accuracy"] - metrics["accuracy"]) <= 0.02
    bf16_rows = [r.split("\t") for r in preds16.read_text().splitlines()[1:]]
    assert sum(a[0] == b[0] for a, b in zip(fp32_rows, bf16_rows)) >= 63
    assert max(abs(p_one(*a) - p_one(*b)) for a, b in zip(fp32_rows, bf16_rows)) < 0.02
    with pytest.raises(SystemExit):                      # one low precision at a time
        main(["evaluate", str(out / "best"), "--int8", "--bf16"])

"""Fine-tuning loop: metrics by hand, repeatability, resume, best checkpoint, mismatches.

A tiny randomly initialised BERT (saved with ``save_pretrained``) stands in for the pretrained
model so each run takes seconds; the MiniLM run through the CLI is in test_cli_finetune.py.
"""
import json
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from bert_gluon import BERTConfig, BERTModel, finetuning
from bert_gluon.checkpoints import CheckpointError, save_pretrained
from bert_gluon.finetuning import FinetuneArgs, classification_metrics, finetune
from bert_gluon.tokenization import Tokenizer
from conftest import data_dir

VOCAB = os.path.join(data_dir("BERT_VOCAB_DIR", "vocab"), "bert-base-uncased-vocab.txt")
MRPC = data_dir("MRPC_DIR", "mrpc")
pytestmark = pytest.mark.skipif(
    not (os.path.isfile(VOCAB) and os.path.isfile(os.path.join(MRPC, "train.tsv"))),
    reason=f"needs {VOCAB} and MRPC in {MRPC}")


def test_classification_metrics_by_hand():
    # labels 1 1 0 0 1 / preds 1 0 0 1 1: TP=2 FP=1 FN=1 TN=1
    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # all negative predictions: F1 of the positive class is 0, accuracy 0.5
    m = classification_metrics([1, 0], [0, 0])
    assert (m["accuracy"], m["f1"]) == (0.5, 0.0)
    # positive class 0: TP=1 (index 2), FP=1 (index 1), FN=1 (index 3) -> F1 = 1/2
    m = classification_metrics([1, 1, 0, 0], [1, 0, 0, 1], positive=0)
    assert m["f1"] == pytest.approx(0.5)
    r = finetuning.regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r["mse"] == pytest.approx(4 / 3) and r["pearson"] == pytest.approx(np.corrcoef(
        [1, 2, 3], [1, 2, 5])[0, 1])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tok = Tokenizer.from_file(VOCAB)
    mx.random.seed(0)
    model = BERTModel(BERTConfig.preset("tiny", vocab_size=len(tok), max_length=32))
    model.initialize()
    return save_pretrained(model, tok, str(tmp_path_factory.mktemp("tiny")))


def args_for(model, out, **kw):
    base = dict(task="mrpc", data_dir=MRPC, model=model, output_dir=str(out), epochs=2,
                batch_size=8, max_len=32, lr=1e-3, max_train_examples=32, max_dev_examples=40,
                log_interval=1, progress=False)
    base.update(kw)
    return FinetuneArgs(**base)


def records(out, event):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def params_of(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(path).items()}


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    return out, finetune(args_for(tiny_model, out), ctx=mx.cpu())


def test_run_outputs_and_truncation_count(reference_run, tiny_model):
    out, summary = reference_run
    assert sorted(os.listdir(out)) == ["args.json", "best", "last", "metrics.jsonl",
                                       "summary.json"]
    dev = records(out, "dev")
    assert [r["epoch"] for r in dev] == [1, 2]
    best = max(dev, key=lambda r: r["accuracy"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["dev"]["accuracy"] == best["accuracy"]
    assert len(records(out, "train")) == 8                   # 4 updates per epoch, logged each
    # over-long pairs: counted independently of the transform
    tok = Tokenizer.from_file(VOCAB)
    from bert_gluon.data import load_task

    rows = load_task("mrpc", "train", data_dir=MRPC)[:32]
    too_long = sum(len(tok.tokenize(a)) + len(tok.tokenize(b)) + 3 > 32 for a, b, _ in rows)
    assert records(out, "data")[0]["train_truncated"] == too_long > 0


def test_same_seed_same_metrics(reference_run, tiny_model, tmp_path):
    out, summary = reference_run
    again = finetune(args_for(tiny_model, tmp_path / "b"), ctx=mx.cpu())
    assert again["dev"] == summary["dev"]
    assert [r["loss"] for r in records(tmp_path / "b", "train")] == \
        [r["loss"] for r in records(out, "train")]
    a = params_of(os.path.join(out, "last", "model.params"))
    b = params_of(str(tmp_path / "b" / "last" / "model.params"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    finetune(args_for(tiny_model, tmp_path / "c", seed=2, epochs=1), ctx=mx.cpu())
    # the first logged loss comes before any update: it differs only through the seed
    assert records(tmp_path / "c", "train")[0]["loss"] != records(out, "train")[0]["loss"]


def test_resume_after_interruption(reference_run, tiny_model, tmp_path, monkeypatch):
    out, summary = reference_run
    real_step, calls = finetuning.optimizer_step, {"n": 0}

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:                                 # in epoch 2 (4 updates per epoch)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(finetuning, "optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(args_for(tiny_model, tmp_path / "r"), ctx=mx.cpu())
    assert json.load(open(tmp_path / "r" / "last" / "state.json"))["epoch"] == 1
    monkeypatch.setattr(finetuning, "optimizer_step", real_step)
    resumed = finetune(args_for(tiny_model, tmp_path / "r", resume=True), ctx=mx.cpu())
    assert resumed["dev"] == summary["dev"] and resumed["last_dev"] == summary["last_dev"]
    a = params_of(os.path.join(out, "last", "model.params"))
    b = params_of(str(tmp_path / "r" / "last" / "model.params"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_early_stopping(tiny_model, tmp_path, monkeypatch):
    flat = {"accuracy": 0.5, "f1": 0.5, "precision": 0.5, "recall": 0.5, "n": 40}
    monkeypatch.setattr(finetuning, "_score", lambda *a: dict(flat))
    s = finetune(args_for(tiny_model, tmp_path, epochs=4, early_stopping=1), ctx=mx.cpu())
    assert s["best_epoch"] == 1 and s["epochs_run"] == 2     # epoch 2 did not improve: stop


def test_evaluate_and_predict_reload_best(reference_run):
    out, summary = reference_run
    best = os.path.join(out, "best")
    pred_path = os.path.join(str(out), "pred.tsv")
    m = finetuning.evaluate(best, split="dev", data_dir=MRPC, predictions=pred_path,
                            ctx=mx.cpu())
    # the checkpoint saw 40 dev pairs during training; evaluate reads the whole dev set
    assert m["n"] == 408
    lines = open(pred_path, encoding="utf-8").read().splitlines()
    assert lines[0] == "label\tprobability" and len(lines) == 409
    out_rows = finetuning.predict(best, [("A man sings .", "A man is singing ."),
                                         ("The cat sat .", "Stocks fell sharply today .")],
                                  ctx=mx.cpu())
    assert all(r["label"] in ("0", "1") and 0.5 <= r["probability"] <= 1 for r in out_rows)
    with pytest.raises(ValueError, match="two non-empty sentences"):
        finetuning.predict(best, [("only one",)], ctx=mx.cpu())


def test_evaluate_same_metrics_on_training_dev_slice(reference_run, tmp_path):
    """Reloading the best checkpoint reproduces the dev metrics logged in training."""
    out, summary = reference_run
    from bert_gluon.data import load_task

    rows = load_task("mrpc", "dev", data_dir=MRPC)[:40]
    path = tmp_path / "dev40.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for a, b, y in rows:
            f.write(f"{y}\t0\t0\t{a}\t{b}\n")
    m = finetuning.evaluate(os.path.join(out, "best"), file=str(path), ctx=mx.cpu())
    assert m["accuracy"] == summary["dev"]["accuracy"]
    assert m["f1"] == pytest.approx(summary["dev"]["f1"])


def test_mismatched_checkpoint_says_so(reference_run, tmp_path):
    out, _ = reference_run
    best = os.path.join(out, "best")
    with pytest.raises(CheckpointError, match="2 classes, 3 were asked for"):
        finetune(args_for(best, tmp_path / "x", class_labels=["a", "b", "c"]), ctx=mx.cpu())
    broken = tmp_path / "broken"
    shutil.copytree(best, broken)
    lines = open(broken / "vocab.txt", encoding="utf-8").read().splitlines()
    (broken / "vocab.txt").write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab"):
        finetuning.evaluate(str(broken), data_dir=MRPC, ctx=mx.cpu())


def test_bf16_finetuning_follows_float32(reference_run, tiny_model, tmp_path):
    """``bf16=True`` (the encoder's dense layers in bfloat16, float32 weights): the same run's
    losses to bfloat16 precision, and a float32 checkpoint. Where oneDNN has no bfloat16
    kernel the run stops at once with an error that says so."""
    from bert_gluon.runtime import bf16_supported

    out, summary = reference_run
    args = args_for(tiny_model, tmp_path / "bf16", bf16=True)
    if not bf16_supported():
        with pytest.raises(RuntimeError, match="bfloat16"):
            finetune(args, ctx=mx.cpu())
        return
    finetune(args, ctx=mx.cpu())
    ref = [r["loss"] for r in records(out, "train")]
    low = [r["loss"] for r in records(tmp_path / "bf16", "train")]
    assert len(low) == len(ref) and low != ref
    # the first loss comes before any update: only bfloat16 rounding separates them
    assert low[0] == pytest.approx(ref[0], rel=5e-3)
    np.testing.assert_allclose(low, ref, rtol=0.05)
    a = params_of(os.path.join(out, "last", "model.params"))
    b = params_of(str(tmp_path / "bf16" / "last" / "model.params"))
    assert all(v.dtype == np.float32 for v in b.values()) and a.keys() == b.keys()


def test_mean_pooling_run_is_kept_by_its_checkpoint(reference_run, tiny_model, tmp_path):
    """``pooling="mean"``: logged, recorded in the best checkpoint, and used again when
    ``evaluate`` reloads it (the same dev metrics as in training); a different head from the
    default run's, so different losses."""
    out, summary = reference_run
    run = tmp_path / "mean"
    s = finetune(args_for(tiny_model, run, pooling="mean", epochs=1, max_dev_examples=None),
                 ctx=mx.cpu())
    assert [r["pooling"] for r in records(run, "model")] == ["mean"]
    assert [r["pooling"] for r in records(out, "model")] == ["cls"]
    meta = json.load(open(os.path.join(run, "best", "config.json"), encoding="utf-8"))
    assert meta["pooling"] == "mean"
    assert not any(k.startswith("pooler") for k in params_of(os.path.join(run, "best",
                                                                          "model.params")))
    assert records(run, "train")[0]["loss"] != records(out, "train")[0]["loss"]
    m = finetuning.evaluate(os.path.join(run, "best"), split="dev", data_dir=MRPC, ctx=mx.cpu())
    assert m["n"] == s["dev"]["n"] == 408
    assert m["accuracy"] == s["dev"]["accuracy"] and m["f1"] == pytest.approx(s["dev"]["f1"])

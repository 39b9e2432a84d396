"""Ours vs Hugging Face ``transformers`` on torch CPU: real all-MiniLM-L6-v2 on MRPC dev pairs,
and a seeded random ``BertForPreTraining`` of an odd shape (MLM and NSP logits)."""
import os

import numpy as np
import pytest

import bert_gluon as bg
import mxnet as mx
from bert_gluon.checkpoints import minilm_dir, save_huggingface
from conftest import data_dir

torch = pytest.importorskip("torch", reason="the Hugging Face reference needs torch")
transformers = pytest.importorskip("transformers", reason="the reference is HF transformers")

TOL = 1e-4


def mrpc_dev():
    path = os.path.join(data_dir("MRPC_DIR", "mrpc"), "dev.tsv")
    if not os.path.exists(path):
        pytest.skip(f"MRPC dev set not found at {path} (set MRPC_DIR)")
    from bert_gluon.data import load_task

    return load_task("mrpc", "dev", data_dir=os.path.dirname(path))


def test_minilm_matches_hf_bertmodel_on_mrpc_pairs():
    from bert_gluon.data import BERTDatasetTransform, batchify_fn

    pairs = [ex[:2] for ex in mrpc_dev()[:16]]
    ours, tok = bg.from_pretrained("all-MiniLM-L6-v2")
    transform = BERTDatasetTransform(tok, max_len=128, has_label=False, pad=False)
    words, valid, segments = batchify_fn(tok.pad_id, has_label=False)([transform(p) for p in pairs])
    lengths = valid.asnumpy().astype(int)
    assert lengths.min() < lengths.max() == words.shape[1]      # really padded

    seq, pooled = (x.asnumpy() for x in ours(words, segments, valid))
    ref = transformers.BertModel.from_pretrained(minilm_dir()).eval()
    ids = torch.tensor(words.asnumpy().astype(np.int64))
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        out = ref(input_ids=ids, token_type_ids=torch.tensor(segments.asnumpy().astype(np.int64)),
                  attention_mask=mask)
    r_seq, r_pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    d_seq = max(np.abs(seq[b, :n] - r_seq[b, :n]).max() for b, n in enumerate(lengths))
    d_pooled = np.abs(pooled - r_pooled).max()
    print(f"\nall-MiniLM-L6-v2 vs HF BertModel, 16 MRPC dev pairs (T={words.shape[1]}): "
          f"max|diff| last_hidden_state {d_seq:.2e}, pooler {d_pooled:.2e}")
    assert d_seq <= TOL and d_pooled <= TOL


def test_minilm_mean_pooled_classifier_pools_like_sentence_transformers():
    """``pooling="mean"`` on all-MiniLM-L6-v2 (the pooling it was trained with, its
    ``1_Pooling/config.json``): the classifier reads the mean of the last layer over the real
    tokens, sentence-transformers' formula on HF ``BertModel``'s outputs, on padded MRPC
    pairs. The default, ``"cls"``, keeps BERT's pooler."""
    from bert_gluon.data import BERTDatasetTransform, batchify_fn

    pairs = [ex[:2] for ex in mrpc_dev()[:16]]
    ours, tok = bg.from_pretrained("all-MiniLM-L6-v2", task="classifier", num_classes=2,
                                   pooling="mean")
    assert ours.pooling == "mean"
    transform = BERTDatasetTransform(tok, max_len=128, has_label=False, pad=False)
    words, valid, segments = (x.as_in_context(mx.cpu()) for x in batchify_fn(
        tok.pad_id, has_label=False)([transform(p) for p in pairs]))
    ours.hybridize(static_alloc=True)
    scores = ours(words, segments, valid).asnumpy()
    pooled = ours.pooler(ours.encoder(words, segments, valid), valid).asnumpy()

    ref = transformers.BertModel.from_pretrained(minilm_dir()).eval()
    inputs = hf_inputs(words, valid, segments)
    with torch.no_grad():
        h = ref(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        r_pooled = ((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
    w, b = ours.output.weight.data().asnumpy(), ours.output.bias.data().asnumpy()
    d_pooled = np.abs(pooled - r_pooled).max()
    d_scores = np.abs(scores - (r_pooled @ w.T + b)).max()
    print(f"\nall-MiniLM-L6-v2 mean pooling vs sentence-transformers' on HF BertModel, "
          f"16 MRPC dev pairs: max|diff| pooled {d_pooled:.2e}, scores {d_scores:.2e}")
    assert d_pooled <= TOL and d_scores <= TOL

    cls, _ = bg.from_pretrained("all-MiniLM-L6-v2", task="classifier", num_classes=2)
    assert cls.pooling == "cls"
    np.testing.assert_array_equal(cls.pooler.dense.weight.data().asnumpy(),
                                  ref.pooler.dense.weight.detach().numpy())


ODD = dict(vocab_size=123, hidden_size=60, num_hidden_layers=3, num_attention_heads=5,
           intermediate_size=97, max_position_embeddings=40, type_vocab_size=3,
           layer_norm_eps=1e-7, hidden_act="gelu", hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0)


def random_hf_pretraining(seed=0):
    torch.manual_seed(seed)
    model = transformers.BertForPreTraining(transformers.BertConfig(**ODD)).eval()
    with torch.no_grad():   # non-trivial LayerNorms and biases, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "LayerNorm.bias", "bias")):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


def write_vocab(directory, size):
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(size - 5)] + ["[UNK]", "[CLS]", "[SEP]",
                                                                      "[MASK]"]
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")


def odd_batch():
    rng = np.random.RandomState(0)
    words = rng.randint(0, ODD["vocab_size"], size=(3, 11))
    segments = rng.randint(0, ODD["type_vocab_size"], size=(3, 11))
    lengths = np.array([11, 8, 5])
    masked = np.array([[0, 3, 10], [1, 2, 7], [4, 4, 0]])
    return words, segments, lengths, masked


def hf_logits(model, words, segments, lengths, masked):
    mask = (np.arange(words.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(words), token_type_ids=torch.tensor(segments),
                    attention_mask=torch.tensor(mask))
    mlm = out.prediction_logits.numpy()
    return np.stack([mlm[b, masked[b]] for b in range(len(words))]), \
        out.seq_relationship_logits.numpy()


def our_logits(model, words, segments, lengths, masked):
    _, mlm, nsp = model(mx.nd.array(words), mx.nd.array(segments), mx.nd.array(lengths),
                        mx.nd.array(masked))
    return mlm.asnumpy(), nsp.asnumpy()


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin",
                                          "model.safetensors.index.json"])
def test_random_odd_shape_bertforpretraining(tmp_path, weights_file):
    ref = random_hf_pretraining()
    if weights_file == "model.safetensors":
        ref.save_pretrained(str(tmp_path))
    elif weights_file == "model.safetensors.index.json":       # sharded
        ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
        assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    else:
        ref.config.save_pretrained(str(tmp_path))
        torch.save(ref.state_dict(), str(tmp_path / "pytorch_model.bin"))
    assert weights_file in os.listdir(tmp_path)
    write_vocab(str(tmp_path), ODD["vocab_size"])

    ours, tok = bg.from_pretrained(str(tmp_path), task="pretraining")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 119, 120, 121, 122)
    assert ours.config.units == 60 and ours.config.hidden_size == 97
    assert ours.config.type_vocab_size == 3 and ours.config.layer_norm_eps == 1e-7
    batch = odd_batch()
    mlm, nsp = our_logits(ours, *batch)
    r_mlm, r_nsp = hf_logits(ref, *batch)
    d_mlm, d_nsp = np.abs(mlm - r_mlm).max(), np.abs(nsp - r_nsp).max()
    print(f"\nodd-shape BertForPreTraining ({weights_file}) max|diff|: MLM logits at masked "
          f"positions {d_mlm:.2e}, NSP logits {d_nsp:.2e}")
    assert d_mlm <= TOL and d_nsp <= TOL


def test_save_huggingface_loads_in_transformers(tmp_path):
    """Ours → HF: the name table used backwards; transformers reads our folder strictly."""
    ref = random_hf_pretraining(seed=1)
    ref.save_pretrained(str(tmp_path / "hf"))
    write_vocab(str(tmp_path / "hf"), ODD["vocab_size"])
    ours, tok = bg.from_pretrained(str(tmp_path / "hf"), task="pretraining")
    out = save_huggingface(ours, tok, str(tmp_path / "ours_as_hf"))
    again, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = odd_batch()
    mlm, nsp = hf_logits(again.eval(), *batch)
    r_mlm, r_nsp = hf_logits(ref, *batch)
    d = max(np.abs(mlm - r_mlm).max(), np.abs(nsp - r_nsp).max())
    print(f"\nHF → ours → save_huggingface → HF max|diff| {d:.2e}")
    assert d <= 1e-6


def test_hf_sequence_classifier_head(tmp_path):
    """A fine-tuned HF BertForSequenceClassification keeps its head (classifier.* → output.*)."""
    torch.manual_seed(2)
    ref = transformers.BertForSequenceClassification(
        transformers.BertConfig(**ODD, num_labels=3)).eval()
    ref.save_pretrained(str(tmp_path))
    write_vocab(str(tmp_path), ODD["vocab_size"])
    ours, _ = bg.from_pretrained(str(tmp_path), task="classifier")
    assert ours.num_classes == 3
    words, segments, lengths, _ = odd_batch()
    mask = (np.arange(words.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(words), token_type_ids=torch.tensor(segments),
                attention_mask=torch.tensor(mask)).logits.numpy()
    got = ours(mx.nd.array(words), mx.nd.array(segments), mx.nd.array(lengths)).asnumpy()
    print(f"\nHF BertForSequenceClassification logits max|diff| {np.abs(got - r).max():.2e}")
    assert np.abs(got - r).max() <= TOL


def test_finetuning_steps_match_hf_training_loop():
    """The fine-tuning update path (classifier head, SoftmaxCE, 'adamw', warm-up schedule,
    global-norm clipping) against the same loop in transformers/torch on real MiniLM and real
    MRPC batches, dropout off and the same batch order: the losses of 6 updates and the final
    logits agree. (With dropout on, the two differ only by random masks and batch order.)"""
    from bert_gluon.data import BERTDatasetTransform, batchify_fn
    from bert_gluon.training import WarmupLinearSchedule, create_trainer, optimizer_step

    rows = load_mrpc_train_rows(48)
    mx.random.seed(0)        # the fresh head's draw, so the result does not depend on test order
    ours, tok = bg.from_pretrained("all-MiniLM-L6-v2", task="classifier", num_classes=2,
                                   dropout=0.0, attention_dropout=0.0)
    ours.hybridize(static_alloc=True)
    ref = transformers.BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():    # the same fresh classifier head on both sides
        ref.classifier.weight.copy_(torch.tensor(ours.output.weight.data().asnumpy()))
        ref.classifier.bias.copy_(torch.tensor(ours.output.bias.data().asnumpy()))
    transform = BERTDatasetTransform(tok, max_len=128, class_labels=["0", "1"], pad=False)
    batches = [[x.as_in_context(mx.cpu()) for x in
                batchify_fn(tok.pad_id)([transform(r) for r in rows[i:i + 8]])]
               for i in range(0, len(rows), 8)]
    # a large lr makes any difference in the update rule show within a few steps
    lr, steps = 1e-3, len(batches)
    schedule = WarmupLinearSchedule(lr, total_steps=steps, warmup_steps=2)
    trainer = create_trainer(ours, "adamw", lr, weight_decay=0.01, epsilon=1e-8)
    loss_fn = mx.gluon.loss.SoftmaxCELoss()
    no_decay = ("bias", "LayerNorm.weight")
    named = list(ref.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if not any(k in n for k in no_decay)],
          "weight_decay": 0.01},
         {"params": [p for n, p in named if any(k in n for k in no_decay)],
          "weight_decay": 0.0}], lr=lr, eps=1e-8)
    ours_losses, ref_losses = [], []
    for step, (words, valid, segments, label) in enumerate(batches, start=1):
        with mx.autograd.record():
            loss = loss_fn(ours(words, segments, valid), label).mean()
        loss.backward()
        trainer.set_learning_rate(schedule(step))
        optimizer_step(trainer, max_grad_norm=1.0)
        ours_losses.append(float(loss.asscalar()))

        out = ref(**hf_inputs(words, valid, segments),
                  labels=torch.tensor(label.asnumpy().astype(np.int64)))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = schedule(step)
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(out.loss))
    words, valid, segments, _ = batches[0]
    logits = ours(words, segments, valid).asnumpy()
    with torch.no_grad():
        r_logits = ref(**hf_inputs(words, valid, segments)).logits.numpy()
    print(f"\nlosses ours {np.round(ours_losses, 5)}\nlosses HF   {np.round(ref_losses, 5)}\n"
          f"final logits max|diff| {np.abs(logits - r_logits).max():.2e}")
    np.testing.assert_allclose(ours_losses, ref_losses, rtol=0, atol=2e-3)
    assert np.abs(logits - r_logits).max() < 5e-3
    assert ours_losses[-1] != ours_losses[0]


def hf_inputs(words, valid, segments):
    """Our padded batch (NDArrays) as transformers' input_ids / attention_mask / token_type_ids."""
    ids = torch.tensor(words.asnumpy().astype(np.int64))
    n = torch.tensor(valid.asnumpy().astype(np.int64))
    return {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1])[None, :] < n[:, None]).long(),
            "token_type_ids": torch.tensor(segments.asnumpy().astype(np.int64))}


def load_mrpc_train_rows(n):
    path = os.path.join(data_dir("MRPC_DIR", "mrpc"), "train.tsv")
    if not os.path.exists(path):
        pytest.skip(f"MRPC train set not found at {path} (set MRPC_DIR)")
    from bert_gluon.data import load_task

    return load_task("mrpc", "train", data_dir=os.path.dirname(path))[:n]

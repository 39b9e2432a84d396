"""The fast paths change speed, never results (no timings here; see benchmarks/).

* hybridize(static_alloc, static_shape) == imperative, also when the batch shape changes
  from one call to the next (bucketing after static_shape);
* the fused interleaved attention ops == a textbook batch_dot attention (the benchmark's
  "before");
* bucketing: a sequence padded to its bucket gives the same outputs as padded to 128;
* the benchmark's candidates hold the same weights (ours, GluonNLP, transformers), its
  MRPC batches are the package's bucketed batches, and its FLOP count is BERT's.
"""
import importlib.util
import os

import mxnet as mx
import numpy as np
import pytest

from bert_gluon import BERTConfig, BERTModel
from conftest import data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = BERTConfig.preset("tiny", dropout=0.0, attention_dropout=0.0)


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_encoder", os.path.join(ROOT, "benchmarks", "bench_encoder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs(B, T, valid, ctx, seed=0):
    r = np.random.RandomState(seed)
    words = r.randint(5, CFG.vocab_size, size=(B, T)).astype("float32")
    segments = (np.arange(T)[None, :] >= T // 2).astype("float32").repeat(B, 0)
    return (mx.nd.array(words, ctx=ctx), mx.nd.array(segments, ctx=ctx),
            mx.nd.array(valid, ctx=ctx))


def _model(ctx, seed=0):
    mx.random.seed(seed)
    net = BERTModel(CFG)
    net.initialize(mx.init.Normal(0.1), ctx=ctx)
    return net


def _copy(src, dst):
    for (_, a), (_, b) in zip(sorted(src._collect_params_with_prefix().items()),
                              sorted(dst._collect_params_with_prefix().items())):
        b.set_data(a.data())


def test_static_hybridization_equals_imperative_across_shapes(ctx):
    eager, static = _model(ctx), _model(ctx, seed=1)
    _copy(eager, static)
    static.hybridize(static_alloc=True, static_shape=True)
    for B, T, valid in [(4, 16, [16, 9, 3, 12]), (2, 24, [24, 5]), (4, 16, [1, 2, 16, 8])]:
        x = _inputs(B, T, valid, ctx, seed=T)
        for a, b in zip(eager(*x), static(*x)):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hybridize", [False, True])
def test_fused_attention_equals_batch_dot_attention(ctx, hybridize):
    bench = _bench()
    fused, plain = _model(ctx), _model(ctx, seed=1)
    _copy(fused, plain)
    for block in plain.encoder.blocks:
        block.attention.hybrid_forward = bench.types.MethodType(bench.plain_attention,
                                                                 block.attention)
    if hybridize:
        fused.hybridize(static_alloc=True)
        plain.hybridize(static_alloc=True)
    x = _inputs(3, 12, [12, 7, 2], ctx)
    for a, b in zip(fused(*x), plain(*x)):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5, rtol=1e-5)


def test_bucket_padding_equals_full_padding(ctx):
    net = _model(ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    valid = [10, 7, 16]
    short = _inputs(3, 16, valid, ctx)
    long_ = [mx.nd.array(np.pad(a.asnumpy(), ((0, 0), (0, 48))), ctx=ctx) for a in short[:2]]
    seq_s, pooled_s = net(*short)
    seq_l, pooled_l = net(long_[0], long_[1], short[2])
    np.testing.assert_allclose(pooled_s.asnumpy(), pooled_l.asnumpy(), atol=1e-5)
    for b, n in enumerate(valid):
        np.testing.assert_allclose(seq_s[b, :n].asnumpy(), seq_l[b, :n].asnumpy(), atol=1e-5)


def test_benchmark_candidates_hold_the_same_weights():
    pytest.importorskip("transformers")
    vocab = os.environ.get("BERT_VOCAB") or os.path.join(
        data_dir("BERT_VOCAB_DIR", "vocab"), "bert-base-uncased-vocab.txt")
    if not os.path.isfile(vocab):
        pytest.skip(f"no vocabulary at {vocab} (set BERT_VOCAB)")
    bench = _bench()
    cfg = BERTConfig.preset("tiny")
    cands = bench.same_weights_candidates(cfg, vocab, threads=2)
    diffs = bench.check_same_outputs(cands, bench.fixed_batch(4, 16, cfg.vocab_size, seed=1))
    assert set(diffs) == {"gluonnlp", "torch"}
    assert max(diffs.values()) < 1e-5, diffs


def test_benchmark_mrpc_batches_are_bucketed():
    mrpc = data_dir("MRPC_DIR", "mrpc")
    vocab = os.environ.get("BERT_VOCAB") or os.path.join(
        data_dir("BERT_VOCAB_DIR", "vocab"), "bert-base-uncased-vocab.txt")
    if not (os.path.isfile(os.path.join(mrpc, "train.tsv")) and os.path.isfile(vocab)):
        pytest.skip(f"MRPC train.tsv or vocabulary missing ({mrpc}, {vocab})")
    bench = _bench()
    layouts = {lay: bench.mrpc_batches(96, 16, lay, vocab, mrpc) for lay in
               ("bucketed", "batch_max", "pad128")}
    lengths = {lay: sorted(np.concatenate([b[2] for b in bs]).tolist())
               for lay, bs in layouts.items()}
    assert lengths["bucketed"] == lengths["pad128"] == lengths["batch_max"]
    assert len(lengths["bucketed"]) == 96
    for words, segments, valid in layouts["bucketed"] + layouts["batch_max"]:
        assert words.shape[1] == valid.max()                   # dynamic padding
        assert words.shape == segments.shape
    assert all(b[0].shape[1] == 128 for b in layouts["pad128"])
    tokens = {lay: sum(b[0].size for b in bs) for lay, bs in layouts.items()}
    assert tokens["bucketed"] < tokens["batch_max"] < tokens["pad128"]
    # the loader over the whole train set gives fine-tuning's batches: full but for the end of
    # a bucket (9) and the cut to 96 pairs (7); over 96 pairs alone, the 10 buckets split them
    assert [b[0].shape[0] for b in layouts["bucketed"]] == [16, 16, 16, 16, 16, 9, 7]
    assert [b[0].shape[0] for b in layouts["batch_max"]] == [16] * 6
    small = bench.mrpc_batches(96, 16, "bucketed", vocab, mrpc, pool=96)
    assert [b[0].shape[0] for b in small] == [8, 9, 12, 9, 4, 11, 12, 16, 2, 13]
    assert sum(b[0].shape[0] for b in small) == 96


def test_benchmark_flop_count_by_hand():
    bench = _bench()
    cfg = BERTConfig(vocab_size=100, units=8, hidden_size=16, num_heads=2, num_layers=3)
    batch = [(np.zeros((2, 5)), None, None)]
    # per layer: QKV+proj 4*C*C, FFN 2*C*H, scores+context 2*T*C per token; 2 FLOPs a MAC
    per_layer = 2 * 2 * 5 * (4 * 64 + 2 * 8 * 16) + 2 * 2 * 2 * 5 * 5 * 8
    assert bench.forward_flops(cfg, batch) == 3 * per_layer + 2 * 2 * 64


def test_onednn_subgraph_fusion_keeps_outputs():
    """hybridize(backend="MKLDNN") fuses dense + GELU etc. for inference; same numbers."""
    ctx = mx.cpu()
    ref, fused = _model(ctx), _model(ctx, seed=1)
    _copy(ref, fused)
    fused.hybridize(static_alloc=True, static_shape=True, backend="MKLDNN")
    x = _inputs(3, 16, [16, 9, 4], ctx)
    for a, b in zip(ref(*x), fused(*x)):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5, rtol=1e-5)

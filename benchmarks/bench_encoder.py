"""Encoder throughput on this machine: bert_gluon vs GluonNLP vs Hugging Face transformers.

    python benchmarks/bench_encoder.py                       # full table (minutes)
    python benchmarks/bench_encoder.py --shapes minilm_l6 --repeats 3 --fast-paths

What is measured, for each shape (``BERTConfig.preset``) and workload:

* ``fixed128``: batch 32 x length 128, every token valid.
* ``mrpc``: ``--mrpc-examples`` MRPC train pairs in the first batches of the package's
  fine-tuning transform and length-bucketed loader over the whole train set
  (``bert_gluon.data``: max 128, dynamic padding): batch 32 at MRPC's real length
  distribution. Every candidate gets the same batches and ``valid_length`` / mask.
  (``--mrpc-pool 96 --mrpc-examples 96``: the loader over 96 pairs only, batches of 2-16:
  the small-batch workload of the results before 2026-12-04.)

Candidates run *alternating in one process* (so machine noise hits them all), each run
times one pass over the workload's batches ending in a host sync; the table shows the
median over ``--repeats`` runs in sequences per second:

* ``ours``: :class:`bert_gluon.BERTModel`, ``hybridize(static_alloc=True, static_shape=True)``;
* ``gluonnlp``: ``gluonnlp.model.BERTModel`` with the same configuration and weights,
  ``hybridize(static_alloc=True)`` (its fused interleaved attention ops included);
* ``torch``: ``transformers.BertModel`` on torch CPU, ``torch.set_num_threads(<cores>)``, in
  its own worker process (``--torch-worker``) that the main process drives in the same
  alternation: in one process with MXNet, torch ran 20-30 % slower than alone (two OpenMP
  runtimes), which would flatter us.

``--task classifier`` times the sentence-pair classifier users fine-tune and evaluate instead
(pooled ``[CLS]`` → Dense(2), the same weights in all three): ``bert_gluon.BERTClassifier``,
whose last layer finishes only the ``[CLS]`` position; ``gluonnlp.model.BERTClassifier``;
``transformers.BertForSequenceClassification``. The loss is then the mean squared score, and
GFLOP/s still counts the whole encoder's work (what the other two do), so ours reads as an
equivalent rate.

``infer`` is a forward pass in prediction mode; ``train`` is forward + backward + Adam
update with dropout on, loss = mean of squared pooled output. ``GFLOP/s`` counts the
matmul work of the padded batches (training = 3x forward) and is divided by the measured
peak of ``mx.nd.FullyConnected`` 4096x768x3072 (and ``torch.matmul``) with all cores.

Peak RSS: each candidate is run again alone in a fresh subprocess (imports, model, 2
inference + 2 training steps on the fixed128 batch); its peak RSS (``VmHWM``) is reported.

``--fast-paths`` adds before/after runs of our model: no hybridization / plain
``hybridize()`` / static_alloc+static_shape; oneDNN subgraph fusion (``backend="MKLDNN"``,
inference); fused attention vs a plain ``batch_dot``
attention (defined only here); MRPC batches padded to 128 vs bucketed; a training loop
reading the loss every step (host sync) vs not; the classifier with its last layer on
``[CLS]`` only vs on every position. ``--fast-paths NAME ...`` runs only those
(``hybridization``, ``onednn``, ``attention``, ``mrpc_layout``, ``static_shape``,
``host_sync``, ``classifier_first_token``).

Results are printed as one table and written to ``benchmarks/results/encoder_<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

_TORCH_ONLY = "--rss-child=torch" in sys.argv or "--torch-worker" in sys.argv
if not _TORCH_ONLY:      # the torch processes must not load MXNet at all
    import bert_gluon  # noqa: E402,F401  (sets OMP_NUM_THREADS to the physical cores)
    from bert_gluon import BERTConfig  # noqa: E402

# words (B, T), segments (B, T), valid_length (B,)
Batch = Tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- workloads

def mrpc_batches(n_examples: int, batch_size: int, layout: str, vocab: str,
                 data_dir: Optional[str] = None, max_len: int = 128, seed: int = 0,
                 pool: Optional[int] = None) -> List[Batch]:
    """``n_examples`` real MRPC train pairs in batches, through the package's own
    :class:`~bert_gluon.data.BERTDatasetTransform` and :func:`~bert_gluon.data.make_dataloader`.

    The length-bucketed loader runs over ``pool`` random train pairs (default: all 3668) and
    the first batches it yields are kept, the last one cut to make ``n_examples``. Over the
    whole train set that is what fine-tuning sees: batches of ``batch_size`` (a bucket's last
    batch is smaller) at MRPC's real length distribution. With ``pool == n_examples`` the 10
    buckets split the few pairs into small batches (96 pairs: 2-16 per batch), the workload
    of the results before 2026-12-04.

    ``layout``: ``"bucketed"`` (length buckets, dynamic padding: what fine-tuning uses),
    ``"batch_max"`` (the same pairs in random batches padded to their longest pair) or
    ``"pad128"`` (the same random batches padded to ``max_len``).
    """
    from bert_gluon.data import (BERTDatasetTransform, batchify_fn, get_task, load_task,
                                 make_dataloader, transform_examples)
    from bert_gluon.tokenization import Tokenizer

    tok = Tokenizer.from_file(vocab)
    examples = load_task("mrpc", "train", data_dir)
    rng = random.Random(seed)
    examples = rng.sample(examples, min(pool or len(examples), len(examples)))
    transform = BERTDatasetTransform(tok, max_len, get_task("mrpc").class_labels, pad=False)
    samples = transform_examples(examples, transform)
    np.random.seed(seed)                       # the bucket sampler shuffles with NumPy's RNG
    loader = make_dataloader(samples, batch_size, tok.pad_id, shuffle=True, num_buckets=10)
    chosen: List[List[int]] = []        # sample indices of each batch
    left = n_examples
    for indices in loader._batch_sampler:
        if left <= 0:
            break
        chosen.append(indices[:left])
        left -= len(chosen[-1])
    if layout != "bucketed":               # the same pairs, in random batches
        flat = [i for b in chosen for i in b]
        rng.shuffle(flat)
        chosen = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    batchify = batchify_fn(tok.pad_id, True, False)
    batches = []
    for indices in chosen:
        words, valid, segments, _ = batchify([samples[i] for i in indices])
        words, segments = words.asnumpy(), segments.asnumpy()
        if layout == "pad128":
            pad = ((0, 0), (0, max_len - words.shape[1]))
            words = np.pad(words, pad, constant_values=tok.pad_id)
            segments = np.pad(segments, pad)
        batches.append((words, segments, valid.asnumpy()))
    return batches


def fixed_batch(batch_size: int, length: int, vocab_size: int, seed: int = 0) -> List[Batch]:
    rng = np.random.RandomState(seed)
    low = min(1000, vocab_size // 2)
    words = rng.randint(low, vocab_size, size=(batch_size, length)).astype(np.float32)
    segments = np.zeros_like(words)
    segments[:, length // 2:] = 1
    return [(words, segments, np.full((batch_size,), length, dtype=np.float32))]


def forward_flops(cfg: BERTConfig, batches: Sequence[Batch], attention: bool = True) -> float:
    """Multiply-add work (2 FLOPs each) of one forward pass over the padded batches;
    ``attention=False``: the dense layers (FullyConnected) only."""
    C, H, L = cfg.units, cfg.hidden_size, cfg.num_layers
    total = 0.0
    for words, _, _ in batches:
        B, T = words.shape
        per_layer = 2 * B * T * (4 * C * C + 2 * C * H) + attention * 2 * 2 * B * T * T * C
        total += L * per_layer + 2 * B * C * C        # + pooler
    return total


# --------------------------------------------------------------------------- matmul peak

def mx_matmul_gflops(repeats: int = 10) -> float:
    """GFLOP/s of ``FullyConnected`` (4096x768) x (768x3072) with MXNet's OpenMP threads."""
    import mxnet as mx

    x = mx.nd.random.uniform(shape=(4096, 768))
    w = mx.nd.random.uniform(shape=(3072, 768))
    b = mx.nd.zeros((3072,))
    return _gemm_rate(lambda: mx.nd.FullyConnected(x, w, b, num_hidden=3072).wait_to_read(),
                      repeats)


_THREAD_CHECK = """
import os, statistics, sys, time
if sys.argv[1] == "with":
    import bert_gluon
import mxnet as mx
x = mx.nd.random.uniform(shape=(4096, 768))
w = mx.nd.random.uniform(shape=(3072, 768))
b = mx.nd.zeros((3072,))
times = []
for i in range(13):
    t = time.perf_counter()
    mx.nd.FullyConnected(x, w, b, num_hidden=3072).wait_to_read()
    times.append(time.perf_counter() - t)
print(os.environ.get("OMP_NUM_THREADS", "unset"),
      2 * 4096 * 768 * 3072 / statistics.median(times[3:]) / 1e9)
"""


def thread_check() -> Dict[str, Dict]:
    """FullyConnected GFLOP/s in fresh processes with no OMP_NUM_THREADS set: plain
    ``import mxnet`` (MXNet's default pool) vs ``import bert_gluon`` first."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = {}
    for mode in ("without", "with"):
        proc = subprocess.run([sys.executable, "-c", _THREAD_CHECK, mode], cwd=ROOT,
                              capture_output=True, text=True, env=env, check=True)
        threads, gflops = proc.stdout.split()[-2:]
        out[f"{mode}_import_bert_gluon"] = {"OMP_NUM_THREADS": threads, "gflops": float(gflops)}
    return out


def torch_matmul_gflops(threads: int) -> float:
    """torch.matmul 4096x768x3072 with ``threads`` threads, in a fresh process (no MXNet)."""
    code = ("import sys, torch; sys.path.insert(0, %r); import bench_encoder as b; "
            "torch.set_num_threads(%d); x, w = torch.rand(4096, 768), torch.rand(768, 3072); "
            "print(b._gemm_rate(lambda: torch.matmul(x, w), 10))" % (HERE, threads))
    proc = subprocess.run([sys.executable, "-c", code, "--torch-worker"], capture_output=True,
                          text=True, check=True)
    return float(proc.stdout.split()[-1])


def _gemm_rate(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2 * 4096 * 768 * 3072 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------- candidates

class Candidate:
    """One implementation: ``load(batches)`` moves inputs in once, ``run(train)`` does one pass."""

    name = "?"

    def load(self, batches: Sequence[Batch]) -> None:
        raise NotImplementedError

    def run(self, train: bool) -> None:
        raise NotImplementedError


class MXNetCandidate(Candidate):
    """Shared by ours and GluonNLP: both take ``(words, segments, valid_length)`` and return
    ``(sequence, pooled)`` (``scores`` alone for a classifier: ``classifier=True``)."""

    def __init__(self, net, name: str, sync_every_step: bool = False, classifier: bool = False):
        import mxnet as mx
        from mxnet import gluon

        self.mx, self.net, self.name = mx, net, name
        self.classifier = classifier
        self.sync_every_step = sync_every_step
        self.trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-5})
        self.inputs: List[tuple] = []

    def load(self, batches):
        nd = self.mx.nd
        self.inputs = [(nd.array(w), nd.array(s), nd.array(v)) for w, s, v in batches]

    def output(self, *inputs):
        """The pooled output, or a classifier's scores."""
        out = self.net(*inputs)
        return out if self.classifier else out[1]

    def run(self, train):
        from mxnet import autograd

        last = None
        for words, segments, valid in self.inputs:
            if train:
                with autograd.record():
                    pooled = self.output(words, segments, valid)
                    loss = (pooled * pooled).mean()
                loss.backward()
                self.trainer.step(1)
                last = loss
                if self.sync_every_step:
                    loss.asscalar()
            else:
                last = self.output(words, segments, valid)
        last.wait_to_read()
        self.mx.nd.waitall()


def ours_model(cfg: BERTConfig, hybridize: str = "static", fused: bool = True, seed: int = 0):
    import mxnet as mx

    mx.random.seed(seed)
    net = bert_gluon.BERTModel(cfg)
    net.initialize(ctx=mx.cpu())
    if not fused:
        for block in net.encoder.blocks:
            block.attention.hybrid_forward = types.MethodType(plain_attention, block.attention)
    if hybridize == "static":
        net.hybridize(static_alloc=True, static_shape=True)
    elif hybridize == "alloc":           # what fine-tuning uses: shapes change batch to batch
        net.hybridize(static_alloc=True)
    elif hybridize == "onednn":          # + oneDNN subgraph fusion (FC+GELU...), inference only
        net.hybridize(static_alloc=True, static_shape=True, backend="MKLDNN")
    elif hybridize == "plain":
        net.hybridize()
    return net


def plain_attention(self, F, X, valid_length=None, *, query_weight, key_weight, value_weight,
                    query_bias, key_bias, value_bias):
    """Textbook multi-head attention with ``batch_dot`` (the "before" of the fused ops).

    Same parameters and result as ``MultiHeadAttention.hybrid_forward``; ``X`` is (T, B, C).
    """
    H = self.num_heads

    def heads(w, b):        # (T, B, C) -> (B*H, T, d)
        y = F.FullyConnected(X, w, b, num_hidden=self.units, flatten=False)
        y = F.transpose(y.reshape((0, 0, H, -1)), axes=(1, 2, 0, 3))
        return y.reshape((-3, 0, 0))

    q, k, v = heads(query_weight, query_bias), heads(key_weight, key_bias), heads(value_weight,
                                                                                   value_bias)
    scores = F.batch_dot(q, k, transpose_b=True) / float(np.sqrt(self.units // H))
    if valid_length is None:
        weights = F.softmax(scores, axis=-1)
    else:
        zeros = F.zeros_like(F.contrib.arange_like(X, axis=0)).reshape((1, -1))
        length = F.broadcast_add(F.reshape(valid_length, (-1, 1)), zeros)
        length = F.broadcast_axis(F.expand_dims(length, axis=1), axis=1, size=H)
        weights = F.softmax(scores, length=F.cast(F.reshape(length, (-3, 0)), "int32"),
                            use_length=True, axis=-1)
    context = F.batch_dot(self.dropout(weights), v)                   # (B*H, T, d)
    context = F.transpose(context.reshape((-4, -1, H, 0, 0)), axes=(2, 0, 1, 3))
    return self.proj(context.reshape((0, 0, -1)))


def gluonnlp_model(cfg: BERTConfig, params: Optional[str] = None, seed: int = 0):
    """GluonNLP 0.10's BERTModel of the same shape; ``params``: a file written by
    :func:`bert_gluon.checkpoints.save_gluonnlp` (our weights in its naming)."""
    import gluonnlp as nlp
    import mxnet as mx

    mx.random.seed(seed)
    encoder = nlp.model.BERTEncoder(num_layers=cfg.num_layers, units=cfg.units,
                                    hidden_size=cfg.hidden_size, max_length=cfg.max_length,
                                    num_heads=cfg.num_heads, dropout=cfg.dropout,
                                    output_attention=False, output_all_encodings=False,
                                    activation="gelu", layer_norm_eps=cfg.layer_norm_eps)
    net = nlp.model.BERTModel(encoder, cfg.vocab_size, cfg.type_vocab_size, cfg.units,
                              embed_size=cfg.units, use_pooler=True, use_decoder=False,
                              use_classifier=False)
    if params:
        net.load_parameters(params, ctx=mx.cpu())
    else:
        net.initialize(init=mx.init.Normal(cfg.initializer_range), ctx=mx.cpu())
    net.hybridize(static_alloc=True)
    return net


class TorchCandidate(Candidate):
    name = "torch"

    def __init__(self, cfg: BERTConfig, threads: int, hf_dir: Optional[str] = None,
                 seed: int = 0, classifier: bool = False):
        """``hf_dir``: a folder written by :func:`bert_gluon.checkpoints.save_huggingface`
        (our weights); without it the model is randomly initialized from ``cfg``.
        ``classifier``: ``BertForSequenceClassification`` from ``hf_dir``, its logits as the
        output."""
        import torch
        from transformers import BertConfig, BertForSequenceClassification, BertModel

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.classifier = torch, classifier
        if hf_dir:
            self.model = (BertForSequenceClassification if classifier
                          else BertModel).from_pretrained(hf_dir)
            self.model.config.hidden_dropout_prob = cfg.dropout
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
            self.inputs = []
            return
        hf = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.units,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        intermediate_size=cfg.hidden_size, max_position_embeddings=cfg.max_length,
                        type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout,
                        attention_probs_dropout_prob=cfg.attention_dropout,
                        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu")
        self.model = BertModel(hf)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.inputs: List[tuple] = []

    def load(self, batches):
        t = self.torch
        self.inputs = []
        for w, s, v in batches:
            mask = (np.arange(w.shape[1])[None, :] < v[:, None]).astype(np.int64)
            self.inputs.append((t.from_numpy(w.astype(np.int64)), t.from_numpy(s.astype(np.int64)),
                                t.from_numpy(mask)))

    def output(self, words, segments, mask):
        """The pooled output, or the classifier's logits."""
        out = self.model(input_ids=words, token_type_ids=segments, attention_mask=mask)
        return out.logits if self.classifier else out.pooler_output

    def run(self, train):
        if train:
            self.model.train()
            for words, segments, mask in self.inputs:
                loss = (self.output(words, segments, mask) ** 2).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        else:
            self.model.eval()
            with self.torch.inference_mode():
                for words, segments, mask in self.inputs:
                    self.model(input_ids=words, token_type_ids=segments, attention_mask=mask)


class TorchProcess(Candidate):
    """A :class:`TorchCandidate` living in its own process (``--torch-worker``), driven over
    JSON lines on its stdin/stdout; batches travel through an ``.npz`` file. ``run`` returns
    once the worker has finished the pass, so the alternation with the MXNet candidates is
    the same as in one process, without torch and MXNet sharing one."""

    name = "torch"

    def __init__(self, cfg, threads: int, hf_dir: str, classifier: bool = False):
        self.tmp = tempfile.mkdtemp(prefix="bench-torch-")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        self._call(cmd="init", config=cfg.to_dict(), threads=threads, hf_dir=hf_dir,
                   classifier=classifier)

    def _call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch worker died during {msg['cmd']}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"torch worker: {reply['error']}")
        return reply

    def load(self, batches):
        path = os.path.join(self.tmp, "batches.npz")
        np.savez(path, **{f"{k}{i}": a for i, b in enumerate(batches) for k, a in zip("wsv", b)})
        self._call(cmd="load", path=path, n=len(batches))

    def run(self, train):
        self._call(cmd="run", train=train)

    def pooled(self) -> np.ndarray:
        path = os.path.join(self.tmp, "pooled.npy")
        self._call(cmd="pooled", path=path)
        return np.load(path)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def torch_worker() -> None:
    """The other end of :class:`TorchProcess` (no MXNet in this process)."""
    cand = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                cfg = types.SimpleNamespace(**msg["config"])
                cand = TorchCandidate(cfg, msg["threads"], msg["hf_dir"],
                                      classifier=msg["classifier"])
            elif msg["cmd"] == "load":
                z = np.load(msg["path"])
                cand.load([tuple(z[f"{k}{i}"] for k in "wsv") for i in range(msg["n"])])
            elif msg["cmd"] == "run":
                cand.run(msg["train"])
            elif msg["cmd"] == "pooled":
                cand.model.eval()
                w, s, m = cand.inputs[0]
                with cand.torch.inference_mode():
                    np.save(msg["path"], cand.output(w, s, m).numpy())
            reply = {"ok": True}
        except Exception as e:  # noqa: BLE001  (reported to the driving process)
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def ours_classifier(encoder_model, seed: int = 0):
    """``bert_gluon.BERTClassifier`` (2 classes) with ``encoder_model``'s encoder and pooler
    weights, hybridized as fine-tuning does."""
    import mxnet as mx

    mx.random.seed(seed)
    clf = bert_gluon.BERTClassifier(encoder_model.config, num_classes=2)
    clf.initialize(ctx=mx.cpu())
    source = encoder_model._collect_params_with_prefix()
    for name, p in clf._collect_params_with_prefix().items():
        if name in source:
            p.set_data(source[name].data())
    clf.hybridize(static_alloc=True)
    return clf


def gluonnlp_classifier(bert, output_weight, output_bias, dropout: float):
    """``gluonnlp.model.BERTClassifier`` around GluonNLP's ``bert`` with our output layer."""
    import gluonnlp as nlp
    import mxnet as mx

    clf = nlp.model.BERTClassifier(bert, num_classes=2, dropout=dropout)
    clf.classifier.initialize(ctx=mx.cpu())
    clf.classifier[-1].weight.set_data(output_weight)
    clf.classifier[-1].bias.set_data(output_bias)
    clf.hybridize(static_alloc=True)
    return clf


def same_weights_candidates(cfg: BERTConfig, vocab: str, threads: int,
                            task: str = "encoder") -> List[Candidate]:
    """Ours, GluonNLP and transformers holding the same (random) weights, copied through
    :mod:`bert_gluon.checkpoints`: the encoder with its pooler, or (``task="classifier"``) the
    sentence-pair classifier."""
    from bert_gluon.checkpoints import save_gluonnlp, save_huggingface
    from bert_gluon.tokenization import Tokenizer

    ours = ours_model(cfg)
    classifier = task == "classifier"
    with tempfile.TemporaryDirectory() as tmp:
        gnlp = gluonnlp_model(cfg, save_gluonnlp(ours, os.path.join(tmp, "gluonnlp.params")))
        if classifier:
            ours = ours_classifier(ours)
            gnlp = gluonnlp_classifier(gnlp, ours.output.weight.data(), ours.output.bias.data(),
                                       cfg.dropout)
        save_huggingface(ours, Tokenizer.from_file(vocab), os.path.join(tmp, "hf"))
        torch_cand = TorchProcess(cfg, threads, os.path.join(tmp, "hf"), classifier=classifier)
    return [MXNetCandidate(ours, "ours", classifier=classifier),
            MXNetCandidate(gnlp, "gluonnlp", classifier=classifier), torch_cand]


def check_same_outputs(cands: Sequence[Candidate], batches: Sequence[Batch]) -> Dict[str, float]:
    """Max |pooled output (or scores) - ours| of each candidate in prediction mode (proves
    equal weights)."""
    words, segments, valid = batches[0]
    pooled = {}
    for c in cands:
        if isinstance(c, TorchProcess):
            c.load(batches)
            pooled[c.name] = c.pooled()
        else:
            c.load(batches)
            pooled[c.name] = c.output(*c.inputs[0]).asnumpy()
    return {k: float(np.abs(v - pooled["ours"]).max()) for k, v in pooled.items() if k != "ours"}


def time_alternating(cands: Sequence[Candidate], batches: Sequence[Batch], train: bool,
                     repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per pass over ``batches`` for each candidate, candidates interleaved."""
    for c in cands:
        c.load(batches)
        for _ in range(warmup):
            c.run(train)
    times: Dict[str, List[float]] = {c.name: [] for c in cands}
    for _ in range(repeats):
        for c in cands:
            time.sleep(0.2)                    # let the other library's OpenMP threads go idle
            t = time.perf_counter()
            c.run(train)
            times[c.name].append(time.perf_counter() - t)
    return times


# --------------------------------------------------------------------------- peak RSS

def rss_child(candidate: str, shape: str, batch_size: int, length: int) -> Dict[str, float]:
    """Run in a fresh subprocess: build one candidate, 2 inference + 2 training steps.

    ``rss_after_imports_mb`` is the process before the model exists (libraries loaded)."""
    if candidate == "torch":       # MXNet not imported: the config comes in as JSON
        cfg = types.SimpleNamespace(**json.loads(os.environ["BENCH_CONFIG"]))
    else:
        cfg = BERTConfig.preset(shape)
    batches = fixed_batch(batch_size, length, cfg.vocab_size)
    base = peak_rss_mb()
    if candidate == "torch":
        cand: Candidate = TorchCandidate(cfg, int(os.environ["OMP_NUM_THREADS"]))
    elif candidate == "gluonnlp":
        cand = MXNetCandidate(gluonnlp_model(cfg), "gluonnlp")
    else:
        cand = MXNetCandidate(ours_model(cfg), "ours")
    cand.load(batches)
    for train in (False, False, True, True):
        cand.run(train)
    return {"peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base}


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over from the parent through fork and exec, so a child would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(candidates: Sequence[str], shape: str, batch_size: int,
                length: int) -> Dict[str, Dict[str, float]]:
    out = {}
    for cand in candidates:
        env = dict(os.environ, BENCH_CONFIG=json.dumps(BERTConfig.preset(shape).to_dict()))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--rss-child={cand}",
                               "--shapes", shape, "--batch-size", str(batch_size),
                               "--length", str(length)],
                              capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"peak-RSS run of {cand} {shape} failed:\n{proc.stderr[-2000:]}")
        out[cand] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------- main

def run_benchmark(args) -> Dict:
    import mxnet as mx

    threads = bert_gluon.runtime.configure_threads()
    result: Dict = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu": bert_gluon.runtime.cpu_description(),
                    "logical_cpus": os.cpu_count(),
                    "physical_cores": bert_gluon.runtime.physical_cores(),
                    "load_avg_at_start": os.getloadavg()},
        "omp_num_threads": threads, "mxnet": mx.__version__, "repeats": args.repeats,
        "task": args.task,
        "rss_method": "each candidate alone in a fresh subprocess (imports + model + 2 "
                      "inference + 2 training steps at batch x length), VmHWM of that process",
        "rows": [], "fast_paths": [],
    }
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers; "
                               "print(torch.__version__, transformers.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    result["torch"], result["transformers"] = versions[-2:]
    result["peak_gflops"] = {"mx_fully_connected": mx_matmul_gflops(),
                             "torch_matmul": torch_matmul_gflops(threads)}
    print(f"OMP_NUM_THREADS={threads}  matmul peak 4096x768x3072: "
          f"MXNet FullyConnected {result['peak_gflops']['mx_fully_connected']:.0f} GFLOP/s, "
          f"torch.matmul {result['peak_gflops']['torch_matmul']:.0f} GFLOP/s", flush=True)
    peak = result["peak_gflops"]["mx_fully_connected"]
    if args.thread_check:
        result["thread_check"] = thread_check()
        print("thread check (fresh processes, OMP_NUM_THREADS unset): " + ", ".join(
            f"{k} -> OMP_NUM_THREADS={v['OMP_NUM_THREADS']}, {v['gflops']:.0f} GFLOP/s"
            for k, v in result["thread_check"].items()), flush=True)

    mrpc = {}
    if "mrpc" in args.workloads:
        layouts = (("bucketed", "batch_max", "pad128") if "mrpc_layout" in fast_path_names(args)
                   else ("bucketed",))
        mrpc = {lay: mrpc_batches(args.mrpc_examples, args.batch_size, lay, args.vocab,
                                  args.mrpc_dir, pool=args.mrpc_pool) for lay in layouts}
        valid = np.concatenate([b[2] for b in mrpc["bucketed"]])
        result["mrpc"] = {"examples": int(len(valid)), "pool": args.mrpc_pool or "all",
                          "batch_sizes": [int(b[0].shape[0]) for b in mrpc["bucketed"]],
                          "mean_valid_length": float(valid.mean()),
                          "padded_tokens": {lay: int(sum(b[0].size for b in bs))
                                            for lay, bs in mrpc.items()},
                          "valid_tokens": int(valid.sum())}

    for shape in args.shapes:
        cfg = BERTConfig.preset(shape)
        cands = same_weights_candidates(cfg, args.vocab, threads, args.task)
        result.setdefault("same_weights_max_abs_diff", {})[shape] = check_same_outputs(
            cands, fixed_batch(4, 16, cfg.vocab_size, seed=1))
        for c in cands:
            if c.name not in args.candidates and isinstance(c, TorchProcess):
                c.close()
        cands = [c for c in cands if c.name in args.candidates]
        workloads = {}
        if "fixed128" in args.workloads:
            workloads["fixed128"] = fixed_batch(args.batch_size, args.length, cfg.vocab_size)
        if mrpc:
            workloads["mrpc"] = mrpc["bucketed"]
        for wname, batches in workloads.items():
            nseq = sum(b[0].shape[0] for b in batches)
            flops = forward_flops(cfg, batches)
            for mode in args.modes:
                train = mode == "train"
                times = time_alternating(cands, batches, train, args.repeats)
                row = {"shape": shape, "task": args.task, "workload": wname, "mode": mode,
                       "sequences": nseq,
                       "padded_lengths": [int(b[0].shape[1]) for b in batches]}
                for name, ts in times.items():
                    med = statistics.median(ts)
                    gflops = flops * (3 if train else 1) / med / 1e9
                    row[name] = {"times_s": ts, "median_s": med, "seq_per_s": nseq / med,
                                 "gflops": gflops, "fraction_of_mx_peak": gflops / peak}
                for other in ("gluonnlp", "torch"):
                    if "ours" in row and other in row:
                        row[f"ours_over_{other}"] = (row["ours"]["seq_per_s"]
                                                     / row[other]["seq_per_s"])
                result["rows"].append(row)
                print(format_row(row), flush=True)
        for c in cands:
            if isinstance(c, TorchProcess):
                c.close()
        del cands
        if fast_path_names(args):
            result["fast_paths"] += fast_paths(cfg, shape, args, mrpc)
        if args.rss:
            result.setdefault("peak_rss", {})[shape] = measure_rss(
                args.candidates, shape, args.batch_size, args.length)
            print(f"peak RSS {shape}: " + ", ".join(
                f"{k} {v['peak_rss_mb']:.0f} MB" for k, v in result["peak_rss"][shape].items()),
                flush=True)
    return result


FAST_PATHS = ("hybridization", "onednn", "attention", "mrpc_layout", "static_shape",
              "host_sync", "classifier_first_token")


def fast_path_names(args) -> set:
    """The fast paths ``--fast-paths`` asks for: none without it, all when it names none."""
    return set() if args.fast_paths is None else set(args.fast_paths or FAST_PATHS)


def fast_paths(cfg: BERTConfig, shape: str, args, mrpc: Dict[str, List[Batch]]) -> List[Dict]:
    """Before/after of each fast path of our model, alternating within each comparison."""
    rows = []
    fixed = fixed_batch(args.batch_size, args.length, cfg.vocab_size)
    wanted = fast_path_names(args)

    def compare(title, cands, batches, train):
        times = time_alternating(cands, batches, train, args.repeats)
        nseq = sum(b[0].shape[0] for b in batches)
        row = {"shape": shape, "fast_path": title, "mode": "train" if train else "infer",
               "seq_per_s": {k: nseq / statistics.median(v) for k, v in times.items()},
               "times_s": times}
        rows.append(row)
        print(f"  fast path {shape:9s} {row['mode']:5s} {title:34s} " + "  ".join(
            f"{k} {v:8.2f}" for k, v in row["seq_per_s"].items()), flush=True)

    for train in (False, True):
        if "hybridization" in wanted:
            compare("hybridization", [MXNetCandidate(ours_model(cfg, "none"), "imperative"),
                                      MXNetCandidate(ours_model(cfg, "plain"), "hybridize()"),
                                      MXNetCandidate(ours_model(cfg, "static"), "static")],
                    fixed, train)
        if "onednn" in wanted and not train:
            compare("oneDNN subgraph fusion", [MXNetCandidate(ours_model(cfg), "static"),
                                               MXNetCandidate(ours_model(cfg, "onednn"),
                                                              "static+MKLDNN backend")],
                    fixed, train)
        if "attention" in wanted:
            compare("attention", [MXNetCandidate(ours_model(cfg, fused=False), "batch_dot"),
                                  MXNetCandidate(ours_model(cfg), "fused")], fixed, train)
        if mrpc and "mrpc_layout" in wanted:
            net = ours_model(cfg)
            for title, lay in (("mrpc padded to 128", "pad128"),
                               ("mrpc random batches, batch max", "batch_max"),
                               ("mrpc bucketed", "bucketed")):
                compare(title, [MXNetCandidate(net, "ours")], mrpc[lay], train)
        if "classifier_first_token" in wanted:
            base = ours_model(cfg)
            every = ours_classifier(base)
            last = every.encoder.blocks[-1]      # before the first call builds the graph
            last.first_token_only = last.attention.first_query_only = False
            cands = [MXNetCandidate(every, "last layer on every token", classifier=True),
                     MXNetCandidate(ours_classifier(base), "last layer on [CLS] only",
                                    classifier=True)]
            for title, batches in (("classifier, fixed", fixed),
                                   ("classifier, mrpc bucketed", mrpc.get("bucketed"))):
                if batches:
                    compare(title, cands, batches, train)
    if mrpc and "static_shape" in wanted:
        for train in (False, True):     # static_shape re-plans memory whenever a shape changes
            compare("static_shape, bucketed mrpc", [
                MXNetCandidate(ours_model(cfg, "static"), "static_alloc+static_shape"),
                MXNetCandidate(ours_model(cfg, "alloc"), "static_alloc")], mrpc["bucketed"], train)
    if mrpc and "host_sync" in wanted:
        net = ours_model(cfg)
        compare("host sync per step (mrpc)",
                [MXNetCandidate(net, "loss.asscalar() each step", sync_every_step=True),
                 MXNetCandidate(net, "no sync")], mrpc["bucketed"], True)
    return rows


def format_row(row: Dict) -> str:
    cells = [f"{row['shape']:9s} {row['workload']:8s} {row['mode']:5s}"]
    for name in ("ours", "gluonnlp", "torch"):
        if name in row:
            r = row[name]
            cells.append(f"{name} {r['seq_per_s']:7.2f} seq/s ({r['gflops']:5.0f} GF/s "
                         f"{100 * r['fraction_of_mx_peak']:3.0f}%)")
    for other in ("gluonnlp", "torch"):
        if f"ours_over_{other}" in row:
            cells.append(f"x{row[f'ours_over_{other}']:.2f} vs {other}")
    return " | ".join(cells)


def print_table(result: Dict) -> None:
    print("\n" + "=" * 100)
    print(f"command: {result['command']}")
    print(f"OMP_NUM_THREADS={result['omp_num_threads']}, peak GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_gflops"].items()))
    for k, v in result.get("thread_check", {}).items():
        print(f"  {k}: OMP_NUM_THREADS={v['OMP_NUM_THREADS']}, FullyConnected "
              f"{v['gflops']:.0f} GFLOP/s")
    header = (f"{'shape':9s} {'workload':8s} {'mode':5s} | {'ours':>8s} {'gluonnlp':>8s} "
              f"{'torch':>8s} | {'/gnlp':>5s} {'/torch':>6s} | ours %peak")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        get = lambda n: f"{row[n]['seq_per_s']:8.2f}" if n in row else f"{'-':>8s}"  # noqa: E731
        ratio = lambda n: (f"{row['ours_over_' + n]:5.2f}" if "ours_over_" + n in row  # noqa: E731
                           else "    -")
        frac = f"{100 * row['ours']['fraction_of_mx_peak']:5.0f}%" if "ours" in row else ""
        print(f"{row['shape']:9s} {row['workload']:8s} {row['mode']:5s} | {get('ours')} "
              f"{get('gluonnlp')} {get('torch')} | {ratio('gluonnlp')} {ratio('torch'):>6s} |"
              f" {frac}")
    print("(sequences per second, median of %d alternating runs)" % result["repeats"])
    for shape, rss in result.get("peak_rss", {}).items():
        print(f"peak RSS {shape}: " + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MB"
                                                for k, v in rss.items()))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["bert_base", "minilm_l6"])
    p.add_argument("--workloads", nargs="+", default=["fixed128", "mrpc"],
                   choices=["fixed128", "mrpc"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--candidates", nargs="+", default=["ours", "gluonnlp", "torch"],
                   choices=["ours", "gluonnlp", "torch"])
    p.add_argument("--task", default="encoder", choices=["encoder", "classifier"],
                   help="the encoder with its pooler (BertModel), or the sentence-pair "
                        "classifier on top (pooled [CLS] -> Dense(2))")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mrpc-examples", type=int, default=256,
                   help="how many MRPC train pairs make the fixed mrpc workload")
    p.add_argument("--mrpc-pool", type=int, default=None,
                   help="bucket this many random train pairs and take the first "
                        "--mrpc-examples of them (default: the whole train set, so the batches "
                        "are --batch-size pairs as in fine-tuning; equal to --mrpc-examples: "
                        "the small batches of the results before 2026-12-04)")
    p.add_argument("--mrpc-dir", default=None, help="MRPC folder (default: $MRPC_DIR or "
                   "../shared/data/mrpc)")
    p.add_argument("--vocab", default=os.environ.get("BERT_VOCAB") or os.path.join(
        ROOT, "..", "shared", "data", "vocab", "bert-base-uncased-vocab.txt"))
    p.add_argument("--fast-paths", nargs="*", default=None, choices=FAST_PATHS,
                   help="also time our fast paths on/off (all, or those named)")
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--no-thread-check", dest="thread_check", action="store_false",
                   help="skip the with/without `import bert_gluon` matmul comparison")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.torch_worker:
        torch_worker()
        return
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.shapes[0], args.batch_size,
                                   args.length)))
        return
    if not os.path.isfile(args.vocab):
        p.error(f"--vocab {args.vocab} not found (set BERT_VOCAB)")
    result = run_benchmark(args)
    print_table(result)
    out = args.out or os.path.join(HERE, "results",
                                   time.strftime("encoder_%Y%m%d_%H%M%S.json", time.gmtime()))
    from bert_gluon.fileio import write_json

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""BERT models: the seed's shapes, a NumPy reference, hybridization, masking, gradients, config."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

from bert_gluon import (BERTClassifier, BERTConfig, BERTEncoder, BERTForPretraining, BERTModel,
                        MeanPooler, MLMDecoder, NSClassifier, PRESETS, Pooler)
from bert_gluon.runtime import (check_gpu, cpu_description, cuda_archs, fast_bf16,
                                gpu_failure_message, physical_cores, resolve_context, runs_on)
from np_reference import init_nontrivial, numpy_params, erf_gelu, layer_norm, np_bert_encoder

CFG = BERTConfig(vocab_size=50, units=16, hidden_size=32, num_heads=4, num_layers=2,
                 max_length=24, dropout=0.1)


def _batch(ctx, B=3, T=9, seed=0, vocab=50):
    rs = np.random.RandomState(seed)
    words = nd.array(rs.randint(0, vocab, (B, T)), ctx=ctx)
    segments = nd.array((np.arange(T)[None] >= rs.randint(1, T, (B, 1))).astype(np.float32),
                        ctx=ctx)
    return words, segments




# --- the seed notebook's numbers ------------------------------------------------------------
def test_seed_shapes(ctx):
    encoder = BERTEncoder(vocab_size=30000, units=768, hidden_size=3072, num_heads=12,
                          num_layers=12, dropout=0.1)
    encoder.initialize(ctx=ctx)
    words = nd.random.randint(low=0, high=30000, shape=(2, 8), ctx=ctx)
    segments = nd.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]], ctx=ctx)
    encodings = encoder(words, segments, None)
    assert encodings.shape == (2, 8, 768)
    decoder = MLMDecoder(vocab_size=30000, units=768)
    decoder.initialize(ctx=ctx)
    for P in (1, 2, 5):
        positions = nd.array(np.random.RandomState(P).randint(0, 8, (2, P)), ctx=ctx)
        assert decoder(encodings, positions).shape == (2, P, 30000)
    ns = NSClassifier(vocab_size=30000, units=768)  # the seed's signature still works
    ns.initialize(ctx=ctx)
    assert ns(encodings).shape == (2, 2)


# --- numbers against an independent reference -----------------------------------------------
def test_encoder_matches_numpy_reference(ctx):
    model = init_nontrivial(BERTModel(CFG), ctx)
    words, segments = _batch(ctx)
    vl = nd.array([9, 4, 6], ctx=ctx)
    seq, pooled = model(words, segments, vl)
    p = numpy_params(model)
    ref = np_bert_encoder(words.asnumpy().astype(int), segments.asnumpy().astype(int), p,
                          CFG.num_layers, CFG.num_heads, vl.asnumpy())
    assert seq.shape == (3, 9, 16) and pooled.shape == (3, 16)
    np.testing.assert_allclose(seq.asnumpy(), ref, rtol=1e-4, atol=1e-4)
    ref_pooled = np.tanh(ref[:, 0] @ p["pooler.dense.weight"].T + p["pooler.dense.bias"])
    np.testing.assert_allclose(pooled.asnumpy(), ref_pooled, rtol=1e-4, atol=1e-4)


def test_classifier_matches_numpy_reference_of_the_full_encoder(ctx):
    """The classifier's last layer finishes only [CLS]; its scores are those of the whole
    encoder's first token (NumPy reference over every position), pooled, then Dense."""
    model = init_nontrivial(BERTClassifier(CFG, num_classes=3), ctx)
    assert [b.first_token_only for b in model.encoder.blocks] == [False, True]
    words, segments = _batch(ctx)
    vl = nd.array([9, 4, 6], ctx=ctx)
    p = numpy_params(model)
    ref = np_bert_encoder(words.asnumpy().astype(int), segments.asnumpy().astype(int), p,
                          CFG.num_layers, CFG.num_heads, vl.asnumpy())
    pooled = np.tanh(ref[:, 0] @ p["pooler.dense.weight"].T + p["pooler.dense.bias"])
    ref_scores = pooled @ p["output.weight"].T + p["output.bias"]
    assert model.encoder(words, segments, vl).shape == (3, 1, 16)
    for hybrid in (False, True):
        if hybrid:
            model.hybridize(static_alloc=True)
        np.testing.assert_allclose(model(words, segments, vl).asnumpy(), ref_scores,
                                   rtol=1e-4, atol=1e-4)


def test_mean_pooled_classifier_matches_numpy_reference(ctx):
    """pooling="mean": the whole encoder runs, its outputs are averaged over the real tokens
    (NumPy reference: a plain loop over positions < valid_length), then Dense."""
    model = init_nontrivial(BERTClassifier(CFG, num_classes=3, pooling="mean"), ctx)
    assert [b.first_token_only for b in model.encoder.blocks] == [False, False]
    assert not list(model.pooler.collect_params().keys())      # no pooler parameters
    words, segments = _batch(ctx)
    vl = nd.array([9, 4, 6], ctx=ctx)
    p = numpy_params(model)
    ref = np_bert_encoder(words.asnumpy().astype(int), segments.asnumpy().astype(int), p,
                          CFG.num_layers, CFG.num_heads, vl.asnumpy())
    pooled = np.stack([ref[b, :n].mean(axis=0) for b, n in enumerate([9, 4, 6])])
    ref_scores = pooled @ p["output.weight"].T + p["output.bias"]
    for hybrid in (False, True):
        if hybrid:
            model.hybridize(static_alloc=True)
        np.testing.assert_allclose(model(words, segments, vl).asnumpy(), ref_scores,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pooling must be one of .*'max'"):
        BERTClassifier(CFG, pooling="max")


def test_mean_pooler_by_hand(ctx):
    X = nd.array([[[1, 2], [3, 4], [100, -100]],
                  [[5, 6], [7, 8], [9, 10]]], ctx=ctx)
    pool = MeanPooler()
    for hybrid in (False, True):
        if hybrid:
            pool.hybridize()
        np.testing.assert_allclose(pool(X, nd.array([2, 3], ctx=ctx)).asnumpy(),
                                   [[2, 3], [7, 8]], rtol=1e-6)
        np.testing.assert_allclose(pool(X, None).asnumpy(), [[104 / 3, -94 / 3], [7, 8]],
                                   rtol=1e-6)


def test_first_token_only_encoder_equals_the_full_one_with_gradients(ctx):
    full = init_nontrivial(BERTEncoder.from_config(CFG), ctx)
    first = BERTEncoder.from_config(CFG, first_token_only=True)
    first.initialize(ctx=ctx)
    for (n1, a), (n2, b) in zip(sorted(full._collect_params_with_prefix().items()),
                                sorted(first._collect_params_with_prefix().items())):
        assert n1 == n2
        b.set_data(a.data())
    words, segments = _batch(ctx, B=4, T=11, seed=8)
    vl = nd.array([11, 3, 7, 1], ctx=ctx)
    outs, grads = [], []
    for enc in (full, first):
        enc.hybridize()
        with autograd.record(train_mode=False):     # dropout off: the same function
            out = enc(words, segments, vl)[:, 0:1]
            loss = (out * nd.arange(16, ctx=ctx)).sum()
        loss.backward()
        outs.append(out.asnumpy())
        grads.append({n: p.grad(ctx).asnumpy()
                      for n, p in sorted(enc._collect_params_with_prefix().items())})
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert outs[1].shape == (4, 1, 16)
    for n in grads[0]:
        np.testing.assert_allclose(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, err_msg=n)


def test_mlm_decoder_gathers_the_right_positions(ctx):
    dec = init_nontrivial(MLMDecoder(50, 16), ctx)
    X = nd.array(np.random.RandomState(1).randn(2, 6, 16), ctx=ctx)
    positions = nd.array([[0, 5, 2], [3, 3, 1]], ctx=ctx)
    scores = dec(X, positions).asnumpy()
    p = numpy_params(dec)
    x = X.asnumpy().astype(np.float64)
    for b in range(2):
        for j, pos in enumerate(positions.asnumpy()[b].astype(int)):
            h = erf_gelu(x[b, pos] @ p["transform.weight"].T + p["transform.bias"])
            h = layer_norm(h, p["norm.gamma"], p["norm.beta"], 1e-12)
            np.testing.assert_allclose(scores[b, j], h @ p["output_weight"].T + p["output_bias"],
                                       rtol=1e-4, atol=1e-4)


def test_pretraining_model_ties_mlm_weight_to_word_embedding(ctx):
    model = BERTForPretraining(CFG)
    assert model.mlm.output_weight is model.encoder.word_embed.weight
    untied = BERTForPretraining(CFG, tie_weights=False)
    assert untied.mlm.output_weight is not untied.encoder.word_embed.weight
    with pytest.raises(ValueError, match="tied_weight"):
        MLMDecoder(51, 16, tied_weight=model.encoder.word_embed.weight)


# --- every model: shapes, hybridize, masking, gradients, determinism ------------------------
def _models():
    return {
        "model": (lambda: BERTModel(CFG), lambda out: [o for o in out]),
        "pretraining": (lambda: BERTForPretraining(CFG), lambda out: [o for o in out]),
        "classifier": (lambda: BERTClassifier(CFG, num_classes=3), lambda out: [out]),
        "classifier_mean": (lambda: BERTClassifier(CFG, num_classes=3, pooling="mean"),
                            lambda out: [out]),
    }


def _call(name, model, words, segments, vl, positions):
    if name == "pretraining":
        return model(words, segments, vl, positions)
    return model(words, segments, vl)


@pytest.mark.parametrize("name", ["model", "pretraining", "classifier", "classifier_mean"])
def test_model_shapes_hybridize_and_masking(ctx, name):
    make, outputs = _models()[name]
    model = init_nontrivial(make(), ctx)
    words, segments = _batch(ctx, seed=3)
    vl = nd.array([9, 5, 2], ctx=ctx)
    positions = nd.array([[1, 8], [0, 4], [1, 1]], ctx=ctx)
    imperative = [o.asnumpy() for o in outputs(_call(name, model, words, segments, vl, positions))]
    expected = {"model": [(3, 9, 16), (3, 16)], "pretraining": [(3, 9, 16), (3, 2, 50), (3, 2)],
                "classifier": [(3, 3)], "classifier_mean": [(3, 3)]}[name]
    assert [o.shape for o in imperative] == expected
    model.hybridize(static_alloc=True)
    hybrid = [o.asnumpy() for o in outputs(_call(name, model, words, segments, vl, positions))]
    for a, b in zip(hybrid, imperative):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # pad every sequence with 6 random tokens: outputs at valid positions do not move
    rs = np.random.RandomState(7)
    words2 = nd.concat(words, nd.array(rs.randint(0, 50, (3, 6)), ctx=ctx), dim=1)
    segments2 = nd.concat(segments, nd.ones((3, 6), ctx=ctx), dim=1)
    padded = [o.asnumpy() for o in outputs(_call(name, model, words2, segments2, vl, positions))]
    if name.startswith("classifier"):
        np.testing.assert_allclose(padded[0], hybrid[0], rtol=1e-4, atol=1e-5)
    else:
        for b, L in enumerate([9, 5, 2]):
            np.testing.assert_allclose(padded[0][b, :L], hybrid[0][b, :L], rtol=1e-4, atol=1e-5)
        for a, b in zip(padded[1:], hybrid[1:]):   # pooled / MLM / NSP outputs
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # inference is deterministic: dropout is off outside autograd.record(train_mode=True)
    again = [o.asnumpy() for o in outputs(_call(name, model, words, segments, vl, positions))]
    for a, b in zip(again, hybrid):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["model", "pretraining", "classifier", "classifier_mean"])
def test_gradient_reaches_every_parameter(ctx, name):
    make, outputs = _models()[name]
    model = init_nontrivial(make(), ctx)
    model.hybridize()
    words, segments = _batch(ctx, seed=4)
    positions = nd.array([[1, 8], [0, 4], [2, 3]], ctx=ctx)
    with autograd.record():
        out = outputs(_call(name, model, words, segments, nd.array([9, 6, 4], ctx=ctx),
                            positions))
        loss = sum((o ** 2).sum() for o in out)
    loss.backward()
    for pname, p in model.collect_params().items():
        assert float(nd.norm(p.grad(ctx)).asscalar()) > 0, f"no gradient reaches {pname}"


def test_dropout_active_in_training(ctx):
    model = init_nontrivial(BERTClassifier(CFG, num_classes=2, dropout=0.5), ctx)
    words, segments = _batch(ctx, seed=5)
    infer = model(words, segments, None).asnumpy()
    with autograd.record(train_mode=True):
        train = model(words, segments, None).asnumpy()
    assert np.abs(train - infer).max() > 1e-4


def test_sinusoidal_position_option(ctx):
    enc = BERTEncoder.from_config(CFG.replace(position="sinusoidal"))
    enc.initialize(ctx=ctx)
    assert "position_embed.weight" not in enc._collect_params_with_prefix()
    words, segments = _batch(ctx)
    assert enc(words, segments, None).shape == (3, 9, 16)


def test_pooler_takes_first_token(ctx):
    pool = init_nontrivial(Pooler(16), ctx)
    X = nd.array(np.random.RandomState(3).randn(2, 5, 16), ctx=ctx)
    X2 = X.copy()
    X2[:, 1:] = 0
    np.testing.assert_array_equal(pool(X).asnumpy(), pool(X2).asnumpy())


# --- config ----------------------------------------------------------------------------------
def test_presets():
    assert (PRESETS["bert_base"].num_layers, PRESETS["bert_base"].units,
            PRESETS["bert_base"].num_heads, PRESETS["bert_base"].hidden_size) == (12, 768, 12, 3072)
    assert (PRESETS["bert_large"].num_layers, PRESETS["bert_large"].units,
            PRESETS["bert_large"].num_heads, PRESETS["bert_large"].hidden_size) == (24, 1024, 16, 4096)
    mini = BERTConfig.preset("minilm_l6")
    assert (mini.num_layers, mini.units, mini.num_heads, mini.hidden_size, mini.head_size) == \
        (6, 384, 12, 1536, 32)
    assert mini.layer_norm_eps == 1e-12 and mini.vocab_size == 30522 and mini.max_length == 512
    assert BERTConfig.preset("tiny", num_layers=3).num_layers == 3


def test_config_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "config.json")
    CFG.to_json(path)
    assert BERTConfig.from_json(path) == CFG
    with pytest.raises(ValueError, match="divisible"):
        BERTConfig(units=10, num_heads=3)
    with pytest.raises(ValueError, match="num_layers"):
        BERTConfig(num_layers=0)
    with pytest.raises(ValueError, match="unknown preset"):
        BERTConfig.preset("bert_huge")
    with pytest.raises(ValueError, match="unknown BERTConfig fields"):
        BERTConfig.from_dict({"units": 8, "hiden_size": 3})


# --- runtime ---------------------------------------------------------------------------------
def _omp_in_subprocess(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if env_value is not None:
        env["OMP_NUM_THREADS"] = env_value
    code = "import os, bert_gluon, mxnet; print(os.environ['OMP_NUM_THREADS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_threads_default_to_physical_cores_but_respect_the_user():
    assert _omp_in_subprocess(None) == str(physical_cores())
    assert _omp_in_subprocess("1") == "1"
    assert physical_cores() >= 1


def test_cpu_description_names_model_and_vector_isa(tmp_path):
    def describe(model, flags):
        path = tmp_path / "cpuinfo"
        path.write_text("".join(f"processor\t: {i}\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                                for i in range(2)))
        return cpu_description(str(path))

    assert describe("AMD EPYC", "fpu sse2 avx fma avx2 bmi2") == "AMD EPYC (AVX2, FMA)"
    assert (describe("Intel(R) Xeon(R) Platinum", "avx2 fma avx512f avx512_vnni amx_tile")
            == "Intel(R) Xeon(R) Platinum (AVX-512, VNNI, AMX)")
    assert (describe("AMD EPYC", "avx2 fma avx512f avx512_vnni avx512_bf16")
            == "AMD EPYC (AVX-512, VNNI, BF16)")
    assert fast_bf16(str(tmp_path / "cpuinfo"))
    assert describe("Old CPU", "fpu sse2") == "Old CPU (no AVX2)"
    assert not fast_bf16(str(tmp_path / "cpuinfo"))
    assert cpu_description(str(tmp_path / "missing")) == "unknown"


def _elf_with_section(name: bytes, payload: bytes) -> bytes:
    """A minimal 64-bit ELF file: a null section, ``.shstrtab`` and ``name`` holding
    ``payload`` (all :func:`cuda_archs` reads)."""
    import struct

    names = b"\0.shstrtab\0" + name + b"\0"
    body = names + b"\0" * (-len(names) % 8)
    data_at = 64 + len(body)
    shoff = data_at + len(payload) + (-len(payload) % 8)
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def section(name_at, offset, size):
        return struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset, size, 0, 0, 1, 0)

    return (bytes(header) + body + payload + b"\0" * (-len(payload) % 8) + bytes(64)
            + section(1, 64, len(names)) + section(11, data_at, len(payload)))


def test_cuda_archs_reads_nvcc_fat_binaries(tmp_path):
    import struct

    # nvcc 13.0's output for sm_86 SASS + compute_80 PTX (tests/data/README.md), 8 bytes of
    # padding, then a hand-made fat binary with one sm_90 SASS entry
    nvcc = open(os.path.join(os.path.dirname(__file__), "data", "nvcc_sm86_ptx80.fatbin"),
                "rb").read()
    entry = bytearray(64)
    struct.pack_into("<HHIQ", entry, 0, 2, 0x101, 64, 8)
    struct.pack_into("<I", entry, 28, 90)
    entry += b"\xff" * 8
    mine = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(entry)) + bytes(entry)
    lib = tmp_path / "libfake.so"
    lib.write_bytes(_elf_with_section(b".nv_fatbin", nvcc + bytes(8) + mine))
    assert cuda_archs(str(lib)) == {"sass": [86, 90], "ptx": [80]}
    # no .nv_fatbin section: no GPU code; not an ELF file: named
    lib.write_bytes(_elf_with_section(b".text", nvcc))
    assert cuda_archs(str(lib)) == {"sass": [], "ptx": []}
    (tmp_path / "x.txt").write_bytes(b"hello, not a library" * 4)
    with pytest.raises(ValueError, match="x.txt: not a 64-bit ELF"):
        cuda_archs(str(tmp_path / "x.txt"))


def test_cuda_archs_of_the_installed_mxnet_match_its_build():
    from mxnet.libinfo import find_lib_path

    archs = cuda_archs(find_lib_path()[0])
    assert bool(archs["sass"] or archs["ptx"]) == mx.runtime.Features().is_enabled("CUDA")


def test_runs_on_follows_cuda_compatibility():
    wheel = {"sass": [50, 60, 70, 80, 86], "ptx": []}   # what mxnet-cu117 1.9.1 carries
    assert runs_on(wheel, 86) and runs_on(wheel, 80) and runs_on(wheel, 89)   # same major
    assert not runs_on(wheel, 90) and not runs_on(wheel, 100)   # Hopper, Blackwell
    assert not runs_on({"sass": [86], "ptx": []}, 80)            # SASS never runs older
    assert runs_on({"sass": [86], "ptx": [80]}, 90)              # PTX: compiled by the driver
    assert not runs_on({"sass": [], "ptx": [90]}, 86)


def test_gpu_failure_message_names_the_cause():
    wheel = {"sass": [50, 60, 70, 80, 86], "ptx": []}
    msg = gpu_failure_message(mx.gpu(0), "no kernel image is available", 90, wheel, "1.9.1")
    assert msg.startswith("MXNet 1.9.1 cannot compute on gpu(0): no kernel image is available.")
    assert "This GPU is sm_90; the MXNet library has machine code for sm_50, sm_60, sm_70, " \
           "sm_80, sm_86 and PTX for none. None of that runs on this GPU." in msg
    assert "built from source" in msg
    ok = gpu_failure_message(mx.gpu(1), "out of memory", 80, wheel, "1.9.1")
    assert ok.startswith("MXNet 1.9.1 cannot compute on gpu(1): out of memory.")
    assert "None of that runs" not in ok          # the code fits: the cause is elsewhere
    assert gpu_failure_message(mx.gpu(0), "boom", None, None, "1.9.1") == \
        "MXNet 1.9.1 cannot compute on gpu(0): boom."


def test_check_gpu_on_a_machine_without_one():
    assert check_gpu(mx.cpu()) is None
    assert resolve_context(mx.cpu()) == mx.cpu()
    if mx.context.num_gpus() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match=r"MXNet \S+ cannot compute on gpu\(0\): "):
        check_gpu(mx.gpu(0))
    with pytest.raises(RuntimeError, match=r"cannot compute on gpu\(0\)"):
        resolve_context(mx.gpu(0))
    assert resolve_context(None) == mx.cpu()


def test_demo_command_prints_seed_shapes(capsys):
    from bert_gluon.cli import main

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "(2, 8, 768)" in out and "(2, 2, 30000)" in out and "(2, 2)" in out

import os

import pytest

import bert_gluon  # noqa: F401  (sets OMP threads before mxnet loads)
import mxnet as mx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))


def _gpu_problem():
    """Why the GPU tests cannot run here (None where they can)."""
    if mx.context.num_gpus() == 0:
        return "no GPU on this machine"
    from bert_gluon.runtime import check_gpu

    try:
        check_gpu(mx.gpu(0))
    except RuntimeError as err:   # e.g. a GPU newer than this MXNet build's kernels
        return str(err)
    return None


def _contexts():
    ctxs = [pytest.param(mx.cpu(), id="cpu")]
    problem = _gpu_problem()
    gpu = pytest.mark.skipif(problem is not None, reason=str(problem))
    ctxs.append(pytest.param("gpu", id="gpu", marks=gpu))
    return ctxs


@pytest.fixture(params=_contexts())
def ctx(request):
    """Every test that takes ``ctx`` runs on the CPU and, when one is present, on GPU 0."""
    return mx.gpu(0) if request.param == "gpu" else request.param


def data_dir(env: str, name: str) -> str:
    """A shared data folder: the environment variable ``env`` or ``../shared/data/name``."""
    return os.environ.get(env) or os.path.join(SHARED_DATA, name)


TOY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + [f"w{i}" for i in range(994)]


def write_toy_vocab(path) -> str:
    """A 1000-token vocabulary (the tiny preset's size): specials, '.', words w0..w993."""
    path.write_text("\n".join(TOY_WORDS) + "\n", encoding="utf-8")
    return str(path)


def write_toy_corpus(path, num_docs: int, stride: int, spread: int, lines=(3, 8),
                     words=(4, 12), seed: int = 0) -> str:
    """One sentence per line, blank lines between documents; document ``d`` draws its words
    from ``w[d * stride .. d * stride + spread]`` (so next-sentence pairs are learnable)."""
    import random

    rng = random.Random(seed)
    out = []
    for d in range(num_docs):
        for _ in range(rng.randint(*lines)):
            out.append(" ".join(f"w{(d * stride + rng.randint(0, spread)) % 990}"
                                for _ in range(rng.randint(*words))) + " .")
        out.append("")
    path.write_text("\n".join(out), encoding="utf-8")
    return str(path)

import os

import pytest

import bert_gluon  # noqa: F401  (sets OMP threads before mxnet loads)
import mxnet as mx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))


def _contexts():
    ctxs = [pytest.param(mx.cpu(), id="cpu")]
    gpu = pytest.mark.skipif(mx.context.num_gpus() == 0, reason="no GPU on this machine")
    ctxs.append(pytest.param("gpu", id="gpu", marks=gpu))
    return ctxs


@pytest.fixture(params=_contexts())
def ctx(request):
    """Every test that takes ``ctx`` runs on the CPU and, when one is present, on GPU 0."""
    return mx.gpu(0) if request.param == "gpu" else request.param


def data_dir(env: str, name: str) -> str:
    """A shared data folder: the environment variable ``env`` or ``../shared/data/name``."""
    return os.environ.get(env) or os.path.join(SHARED_DATA, name)

"""bert_gluon: BERT on Apache MXNet/Gluon, built to be read, pre-trained and fine-tuned.

Importing this package sets ``OMP_NUM_THREADS`` to the number of physical cores
(unless already set) before MXNet is loaded; see :mod:`bert_gluon.runtime`.
"""
from .runtime import configure_threads as _configure_threads

_configure_threads()

from .config import PRESETS, BERTConfig  # noqa: E402
from .layers import (AddNorm, EncoderBlock, MultiHeadAttention, PositionalEncoding,  # noqa: E402
                     PositionWiseFFN)
from .model import (BERTClassifier, BERTEncoder, BERTForPretraining, BERTModel,  # noqa: E402
                    MeanPooler, MLMDecoder, NSClassifier, Pooler)
from .runtime import check_gpu, default_context, seed_everything  # noqa: E402

__version__ = "0.1.0"
from .checkpoints import from_pretrained, save_pretrained  # noqa: E402

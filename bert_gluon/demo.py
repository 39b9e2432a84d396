"""The tutorial's first cells as a function: build the blocks, print their output shapes."""
from __future__ import annotations

from typing import Dict, Tuple


def shapes_demo(print_fn=print) -> Dict[str, Tuple[int, ...]]:
    """Build BERT-base's encoder, the MLM decoder and the NSP classifier as the seed
    notebook does, run them on a random batch of 2 x 8 tokens and report the shapes."""
    import mxnet as mx
    from mxnet import nd

    from .model import BERTEncoder, MLMDecoder, NSClassifier

    mx.random.seed(0)
    encoder = BERTEncoder(vocab_size=30000, units=768, hidden_size=3072, num_heads=12,
                          num_layers=12, dropout=0.1)
    encoder.initialize()
    words = nd.random.randint(low=0, high=30000, shape=(2, 8))
    segments = nd.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    encodings = encoder(words, segments, None)
    decoder = MLMDecoder(vocab_size=30000, units=768)
    decoder.initialize()
    mlm = decoder(encodings, nd.array([[0, 1], [4, 7]]))
    ns = NSClassifier(units=768)
    ns.initialize()
    nsp = ns(encodings)
    shapes = {"encodings": encodings.shape, "mlm_scores": mlm.shape, "nsp_scores": nsp.shape}
    for name, shape in shapes.items():
        print_fn(f"{name:>10}: {shape}")
    return shapes

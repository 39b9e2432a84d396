"""One configuration object for every BERT shape, with named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict


# what a BERTClassifier's output layer reads: the [CLS] pooler, or the mean over the real tokens
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class BERTConfig:
    """Hyper-parameters of a BERT encoder.

    Defaults are BERT-base (uncased vocabulary). ``hidden_size`` is the width of the
    position-wise feed-forward layer (Hugging Face calls it ``intermediate_size``);
    ``units`` is the model width (Hugging Face's ``hidden_size``).
    """

    vocab_size: int = 30522
    units: int = 768
    hidden_size: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    max_length: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    position: str = "learned"  # "learned" (real checkpoints) or "sinusoidal" (the tutorial's)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "units", "hidden_size", "num_heads", "num_layers",
                     "max_length", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BERTConfig.{name} must be a positive int, got {value!r}")
        if self.units % self.num_heads:
            raise ValueError(f"BERTConfig.units ({self.units}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.position not in ("learned", "sinusoidal"):
            raise ValueError(f"BERTConfig.position must be 'learned' or 'sinusoidal', "
                             f"got {self.position!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BERTConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_size(self) -> int:
        return self.units // self.num_heads

    def replace(self, **changes: Any) -> "BERTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BERTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown BERTConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "BERTConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BERTConfig":
        """A named shape (see ``PRESETS``), optionally with some fields changed."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return base.replace(**overrides)


PRESETS: Dict[str, BERTConfig] = {
    # Devlin et al. 2018
    "bert_base": BERTConfig(units=768, hidden_size=3072, num_heads=12, num_layers=12),
    "bert_large": BERTConfig(units=1024, hidden_size=4096, num_heads=16, num_layers=24),
    # sentence-transformers/all-MiniLM-L6-v2: 384 / 12 heads = head size 32
    "minilm_l6": BERTConfig(units=384, hidden_size=1536, num_heads=12, num_layers=6),
    # small shapes for pre-training on a laptop and for tests
    "small": BERTConfig(units=256, hidden_size=1024, num_heads=4, num_layers=4, max_length=128),
    "tiny": BERTConfig(vocab_size=1000, units=64, hidden_size=128, num_heads=4, num_layers=2,
                       max_length=64),
}

"""Model hyper-parameters, named exactly as in Meta's params.json.

`ModelArgs` is the one description of a model shape in the project. The constructors below
read Meta's params.json and llama2.c's binary header (Hugging Face config.json: see
llama/hf_config.py) and raise `ConfigError` naming the file and field
when something is missing or inconsistent.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration is missing a field or holds an impossible value."""


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a LLaMA-2 model. Field names follow Meta's params.json.

    `hidden_dim` is not in Meta's params.json: when None the FFN width follows Meta's rule
    (see `ffn_hidden_dim`); Hugging Face and llama2.c headers state it explicitly.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.hidden_dim is not None:
            _check_positive_int("hidden_dim", self.hidden_dim)
        for name in ("norm_eps", "rope_theta"):
            _check_positive_number(name, getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            _check_positive_number("ffn_dim_multiplier", self.ffn_dim_multiplier)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"dim: expected a multiple of n_heads={self.n_heads}, found {self.dim}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head size, found {self.head_dim}")
        kv = self.kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0 or self.n_heads % kv:
            raise ConfigError(
                f"n_kv_heads: expected a positive divisor of n_heads={self.n_heads}, "
                f"found {self.n_kv_heads!r}"
            )
        if self.ffn_hidden_dim <= 0:
            raise ConfigError(
                f"ffn_dim_multiplier: gives a feed-forward width of {self.ffn_hidden_dim}, "
                "expected a positive one"
            )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads for plain MHA)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head: the size of one GQA group."""
        return self.n_heads // self.kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: explicit hidden_dim, else Meta's rule from llama/model.py.

        4*dim, times 2/3 (SwiGLU has three matrices), times ffn_dim_multiplier, rounded up
        to a multiple of multiple_of. 7B: 11008, 13B: 13824, 70B: 28672.
        """
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def attention_kind(self) -> str:
        """One of "MHA", "GQA" or "MQA"."""
        if self.kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.kv_heads == 1 else "GQA"

    def n_params(self, tied: bool = False) -> int:
        """Parameter count (output projection counted unless tied to the embedding)."""
        d, h, kv = self.dim, self.ffn_hidden_dim, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + 2 * d * kv + 3 * d * h + 2 * d
        embed = self.vocab_size * d
        return self.n_layers * per_layer + embed * (1 if tied else 2) + d

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # Serialisation -------------------------------------------------------------------------
    def to_params_json(self) -> dict[str, Any]:
        """What Meta's params.json holds (plus hidden_dim when it overrides the rule)."""
        out = dataclasses.asdict(self)
        if out["hidden_dim"] is None:
            del out["hidden_dim"]
        return out

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> ModelArgs:
        """Read Meta's params.json. vocab_size -1 (Meta's placeholder) must be overridden.

        Fields that are not ModelArgs fields are refused by name (they may change the maths:
        Llama 3.1's `use_scaled_rope: true`), except `max_batch_size` (Meta's generation
        setting) and a false `use_scaled_rope`.
        """
        path = Path(path)
        raw = read_json_object(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_params_extras(path, {k: v for k, v in raw.items() if k not in fields})
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs.update(overrides)
        for key in ("dim", "n_layers", "n_heads"):
            if key not in kwargs:
                raise ConfigError(f"{path}: missing required field {key!r}")
        if kwargs.get("vocab_size", 0) in (-1, None):
            raise ConfigError(
                f"{path}: vocab_size is -1; pass the tokenizer's vocabulary size instead"
            )
        return _build(cls, kwargs, path)

    @classmethod
    def from_llama2c_header(
        cls, header: tuple[int, ...], source: str = "llama2.c header"
    ) -> ModelArgs:
        """llama2.c's header: (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len).

        The vocab size's sign only says whether the classifier is shared; the caller handles it.
        """
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
        kwargs = dict(
            dim=dim,
            hidden_dim=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=abs(vocab),
            max_seq_len=seq_len,
        )
        return _build(cls, kwargs, source)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, found {value!r}")


def _check_positive_number(name: str, value: object) -> None:
    """A finite number above zero: NaN compares false with everything, so say it outright."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}: expected a finite positive number, found {value!r}")


def _check_params_extras(path: Path, extras: dict[str, Any]) -> None:
    for key, value in extras.items():
        if key == "max_batch_size" or (key == "use_scaled_rope" and value is False):
            continue
        if key == "use_scaled_rope":
            raise ConfigError(
                f"{path}: use_scaled_rope: expected false (Llama 3.1's scaled RoPE is not "
                f"implemented), found {value!r}"
            )
        raise ConfigError(
            f"{path}: field {key!r} is not a LLaMA setting this runtime knows (found "
            f"{str(value)[:80]}); it may change the model's maths, so it is refused"
        )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _build(cls: type[ModelArgs], kwargs: dict[str, Any], source: object) -> ModelArgs:
    try:
        return cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


# Published shapes, for benchmarks and the README's memory arithmetic.
PRESETS: dict[str, ModelArgs] = {
    "stories260K": ModelArgs(
        dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172, max_seq_len=512
    ),
    "stories15M": ModelArgs(
        dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768, max_seq_len=256
    ),
    "tinyllama-1.1b": ModelArgs(
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        vocab_size=32000,
        hidden_dim=5632,
        max_seq_len=2048,
    ),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "llama2-70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=32000,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
    ),
}

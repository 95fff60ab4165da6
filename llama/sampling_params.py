"""Sampling parameters: what the samplers of llama/sampling.py are set to, checked on creation.

Kept free of torch so that the terminal's --help and the UI's settings read the defaults
without importing it (llama/sampling.py re-exports everything here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


class SamplingError(ValueError):
    """A sampling parameter is out of range (the message names the field)."""


# (field, lowest, highest, what) for the float fields; bounds are inclusive.
_FLOAT_RANGES = {
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 100.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are Meta's chat defaults (T=0.6, top-p 0.9).

    temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off. min_p: 0 = off.
    repetition_penalty: 1 = off. presence/frequency_penalty: 0 = off, OpenAI's range [-2, 2].
    seed: None draws fresh randomness; an int makes the sampled tokens reproducible.
    max_new_tokens: generated tokens at most (>= 1). stop: strings that end the reply (the
    stop string itself is not part of the text).
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, (lo, hi) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name}: expected a number, found {value!r}")
            if not (math.isfinite(value) and lo <= value <= hi):
                raise SamplingError(f"{name}: expected a value in [{lo}, {hi}], found {value!r}")
            object.__setattr__(self, name, float(value))
        _check_int("top_k", self.top_k, 0, 1 << 31)
        _check_int("max_new_tokens", self.max_new_tokens, 1, 1 << 31)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, (1 << 63) - 1)
        object.__setattr__(self, "stop", _check_stop(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (
            1.0,
            0.0,
            0.0,
        )

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)  # type: ignore[arg-type]


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SamplingError(f"{name}: expected an int in [{lo}, {hi}], found {value!r}")


def _check_stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (tuple, list)):
        raise SamplingError(f"stop: expected a tuple of strings, found {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingError(f"stop: at most {MAX_STOP_STRINGS} strings, found {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise SamplingError(f"stop: expected non-empty strings, found {s!r}")
    return tuple(stop)

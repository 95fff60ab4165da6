"""Sampling parameters and pure functions over next-token logits.

All functions take fp32 logits of shape (V,) for one sequence and return new tensors (the
input is never modified). The order applied by `process_logits` is:

1. penalties on the raw logits: repetition (Keskar et al. 2019, CTRL: a seen token's logit
   is divided by the penalty when positive, multiplied when negative) over prompt and
   generated tokens; presence and frequency (OpenAI's definition: logit -= presence * [count
   > 0] + frequency * count) over generated tokens only, as in vLLM;
2. temperature (logits / T; T == 0 means greedy: only the argmax survives);
3. top-k (keep the k largest), 4. top-p (Holtzman et al. 2020, nucleus: keep the smallest set
   of most probable tokens whose mass reaches p, always at least one), 5. min-p (keep tokens
   with probability >= min_p * the top probability), each on the distribution left by the
   previous step.

Removed tokens get -inf, so softmax of the result is the distribution that is sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


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


def apply_penalties(
    logits: Tensor, seen: Tensor | None, counts: Tensor | None, params: SamplingParams
) -> Tensor:
    """Penalise logits (V,): `seen` (V,) bool over prompt + generated tokens for the
    repetition penalty, `counts` (V,) float occurrences among generated tokens for the
    presence/frequency penalties. Returns logits unchanged when every penalty is off."""
    out = logits
    if params.repetition_penalty != 1.0 and seen is not None:
        p = params.repetition_penalty
        penalised = torch.where(out > 0, out / p, out * p)
        out = torch.where(seen, penalised, out)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        out = out - params.frequency_penalty * counts
        out = out - params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / T for T > 0; for T == 0 a one-hot (0 at the argmax, -inf elsewhere)."""
    if temperature == 0.0:
        return greedy_mask(logits)
    return logits / temperature if temperature != 1.0 else logits


def greedy_mask(logits: Tensor) -> Tensor:
    """0 at the (first) argmax, -inf elsewhere: softmax of it is one-hot."""
    out = torch.full_like(logits, -math.inf)
    return out.index_fill_(-1, logits.argmax(-1, keepdim=True), 0.0)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties at the k-th value are kept too); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the most probable tokens until their mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more probable tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most probable token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is >= min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def process_logits(
    logits: Tensor,
    params: SamplingParams,
    seen: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Raw logits (V,) -> the logits whose softmax is sampled (order in the module doc)."""
    out = apply_penalties(logits, seen, counts, params)
    if params.greedy:
        return greedy_mask(out)
    out = apply_temperature(out, params.temperature)
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def sample(probs: Tensor, generator: torch.Generator | None, greedy: bool = False) -> Tensor:
    """One token id (shape (1,), on the probs' device) drawn from probs (V,).

    probs is softmax(process_logits(...)). greedy takes the argmax without drawing (same
    token, no random number consumed)."""
    if greedy:
        return probs.argmax(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


def choose(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: Tensor | None = None,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The next token id (shape (1,)) for raw logits (V,), and the distribution it was drawn
    from: softmax(process_logits(...)), or None for greedy, whose distribution is one-hot at
    the argmax of the penalised logits (taken directly: no mask, no softmax, no draw)."""
    if params.greedy:
        return apply_penalties(logits, seen, counts, params).argmax(-1, keepdim=True), None
    probs = torch.softmax(process_logits(logits, params, seen, counts), dim=-1)
    return sample(probs, generator), probs


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A torch.Generator on `device`, seeded with `seed` or from fresh entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen

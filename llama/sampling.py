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

import torch
from torch import Tensor

from llama.sampling_params import (  # noqa: F401  (re-exported)
    MAX_STOP_STRINGS,
    SamplingError,
    SamplingParams,
)


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

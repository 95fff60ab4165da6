"""What if: zero one attention head (or one GQA group) and replay the reply; or replay it
under other sampler settings. Same prompt, same seed: any difference is the change's doing.

An ablation zeroes the chosen heads' attention output (before wo) for every query at or after
`start`, through the attention observer (llama/model.py lets an observer edit `out` in
place). Positions before `start` run unchanged, so a replay reproduces the original reply up
to there and then shows where it departs. Replays go through generate() itself: the same
sampling, penalties and stop rules as the chat. Under tensor parallelism each rank zeroes the
heads it holds (ParallelTransformer.ablate), and the replay runs on every rank in lockstep like
any generation (rank 0 announces each call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llama.config import ModelArgs
from llama.generate import NO_TOKEN, Step, generate
from llama.model import AttentionCapture, AttentionObserver, Transformer
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer


class AblationError(ValueError):
    """An ablation or replay that cannot run (the message names the field and the value)."""


@dataclass(frozen=True)
class Ablation:
    """Zero query heads `heads` of `layer` for queries at absolute positions >= start."""

    layer: int
    heads: tuple[int, ...]
    start: int = 0

    def check(self, args: ModelArgs) -> None:
        if not 0 <= self.layer < args.n_layers:
            raise AblationError(f"layer: expected 0..{args.n_layers - 1}, found {self.layer}")
        bad = [h for h in self.heads if not 0 <= h < args.n_heads]
        if not self.heads or bad:
            raise AblationError(
                f"heads: expected query heads in 0..{args.n_heads - 1}, found {list(self.heads)}"
            )
        if self.start < 0:
            raise AblationError(f"start: expected a position >= 0, found {self.start}")

    def observer(self) -> AttentionObserver:
        heads = list(self.heads)

        def zero(cap: AttentionCapture) -> None:
            if cap.layer != self.layer:
                return
            rows = cap.input_pos >= self.start  # (T,)
            for h in heads:
                cap.out[:, h][:, rows] = 0  # (B, T, D) view of the output wo reads

        return zero

    def describe(self, args: ModelArgs) -> str:
        n_rep = args.n_rep
        g = self.heads[0] // n_rep
        if n_rep > 1 and list(self.heads) == group_heads(args, g):
            return f"layer {self.layer}, GQA group {g} (heads {self.heads[0]}-{self.heads[-1]})"
        return f"layer {self.layer}, head{'s' * (len(self.heads) > 1)} " + ", ".join(
            map(str, self.heads)
        )


def group_heads(args: ModelArgs, group: int) -> list[int]:
    """The query heads reading KV head `group` (group g: heads g*n_rep .. g*n_rep+n_rep-1)."""
    if not 0 <= group < args.kv_heads:
        raise AblationError(f"group: expected 0..{args.kv_heads - 1}, found {group}")
    return list(range(group * args.n_rep, (group + 1) * args.n_rep))


class AblationProbe:
    """A generate() probe that only installs an Ablation while the reply is generated."""

    def __init__(self, ablation: Ablation) -> None:
        self.ablation = ablation

    def begin(self, model: Transformer, prompt_ids: Any) -> None:
        install(model, self.ablation)

    def on_step(self, step: Step) -> None:
        pass

    def end(self, model: Transformer) -> None:
        model.set_observer(None)


def install(model: Transformer, ablation: Ablation) -> None:
    """Make `model` run with `ablation` until `model.set_observer(None)`. Split over ranks,
    each rank zeroes its own heads: rank 0's observer would only see gathered copies."""
    ablation.check(model.args)
    tp = getattr(model, "tp", None)
    if tp is not None and tp.distributed:
        model.ablate(ablation.layer, list(ablation.heads), ablation.start)
    else:
        model.set_observer(ablation.observer(), {ablation.layer})


@dataclass(frozen=True)
class Replay:
    """The original reply and a replay. original/replayed: token ids of each reply;
    diverge: the first index where they differ (None: identical); p_original/p_changed (R,):
    the original tokens' probabilities step by step along the original text, without and
    with the change (teacher-forced: the same context at every step)."""

    original: list[int]
    replayed: list[int]
    replay_steps: list[Step]
    diverge: int | None
    p_original: Tensor
    p_changed: Tensor


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where a and b differ, len of the shorter if one is a prefix of the
    other (and they differ in length), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def reply_ids(steps: Sequence[Step]) -> list[int]:
    return [s.token_id for s in steps if s.token_id != NO_TOKEN]


def replay(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    original: Sequence[int],
    ablation: Ablation | None,
) -> Replay:
    """Generate again from prompt_ids with params (its seed must be the original's) and the
    ablation (None: nothing changed); compare with the original reply ids."""
    if params.seed is None:
        raise AblationError("seed: a replay needs the original reply's seed, found None")
    probe = AblationProbe(ablation) if ablation is not None else None
    steps = list(generate(model, tokenizer, list(prompt_ids), params, probe=probe))
    new = reply_ids(steps)
    ids = [*prompt_ids, *original]
    base = forced_probs(model, ids, len(prompt_ids), None)
    changed = forced_probs(model, ids, len(prompt_ids), ablation)
    return Replay(list(original), new, steps, first_divergence(original, new), base, changed)


@torch.inference_mode()
def forced_probs(
    model: Transformer, ids: Sequence[int], prompt_len: int, ablation: Ablation | None
) -> Tensor:
    """p(ids[t] | ids[:t]) for t = prompt_len .. len(ids)-1 in one uncached forward: (R,)."""
    if ablation is not None:
        install(model, ablation)
    try:
        dev = model.tok_embeddings.weight.device
        logits = model(torch.tensor([list(ids[:-1])], device=dev))[0, prompt_len - 1 :]  # (R, V)
    finally:
        if ablation is not None:
            model.set_observer(None)
    target = torch.tensor(ids[prompt_len:], device=logits.device)
    return torch.softmax(logits.float(), -1).gather(1, target[:, None])[:, 0].cpu()


@dataclass(frozen=True)
class SamplerComparison:
    """Two replies from one prompt and seed under settings a and b; differ: the indices
    where their tokens differ (position by position); diverge: the first of them."""

    steps_a: list[Step]
    steps_b: list[Step]
    differ: list[int]
    diverge: int | None


def compare_samplers(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    a: SamplingParams,
    b: SamplingParams,
) -> SamplerComparison:
    """Generate under a and under b (b takes a's seed); mark where the tokens differ."""
    if a.seed is None:
        raise AblationError("seed: comparing samplers needs a fixed seed, found None")
    b = b.replace(seed=a.seed)
    steps_a = list(generate(model, tokenizer, list(prompt_ids), a))
    steps_b = list(generate(model, tokenizer, list(prompt_ids), b))
    ids_a, ids_b = reply_ids(steps_a), reply_ids(steps_b)
    n = max(len(ids_a), len(ids_b))
    differ = [i for i in range(n) if i >= min(len(ids_a), len(ids_b)) or ids_a[i] != ids_b[i]]
    return SamplerComparison(steps_a, steps_b, differ, first_divergence(ids_a, ids_b))

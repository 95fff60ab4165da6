"""The token inspector: the last reply as tokens coloured by probability; a click on a token
shows that step's candidates before/after the samplers and the views as they were at that step;
"continue from here" branches the reply at that token (earlier versions stay reachable).

The views of a past step are recomputed, not stored: the model reads the prompt and the reply's
tokens before that step in one prefill with a fresh Probe (a cached decode equals the full
forward, tests/test_model.py), so any step of any length of reply can be shown at the cost of
one prefill, and the live capture keeps its bounded window.

Other views attach to a token selection through `on_token_selected(callback)`: each callback
gets (runtime, record, index) and its return value is ignored (issue 18's "what drove this
token" hooks in here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llama.generate import Step
from llama.probes import Trace
from llama.sampling import SamplingParams
from ui.runtime import Runtime
from ui.turn import Message, TurnUpdate, Views, make_probe

OUTPUT_KEYS = ("tokens", "record", "inspect_info", "candidate", "branch_pick")
# Probability bins, most likely first: (lowest p, label); colours in ui/layout.py.
BINS = (
    (0.9, "p ≥ 0.9"),
    (0.5, "p 0.5–0.9"),
    (0.2, "p 0.2–0.5"),
    (0.05, "p 0.05–0.2"),
    (0.0, "p < 0.05"),
)
BIN_COLOURS = ("#1a9850", "#91cf60", "#fee08b", "#fc8d59", "#d73027")
HINT = "Click a token of the reply to see its step."

SelectionHook = Callable[[Runtime, "ReplyRecord", int], Any]
_HOOKS: list[SelectionHook] = []


def on_token_selected(callback: SelectionHook) -> None:
    """Call `callback(runtime, record, index)` whenever token `index` of the shown reply is
    selected in the inspector (after the inspector drew its own figures)."""
    _HOOKS.append(callback)


@dataclass(frozen=True)
class Version:
    """One version of the reply: its text and steps (one per generated token)."""

    text: str
    steps: list[Step]


@dataclass(frozen=True)
class ReplyRecord:
    """The last reply as the inspector needs it. prompt_ids: what the model read before the
    reply's first token (without any branch prefix); versions[current] is the one shown;
    settings/views/template/system: how it was made (a branch reuses them)."""

    history: list[Message]  # the dialog up to the user message the reply answers
    prompt_ids: list[int]
    settings: SamplingParams
    views: Views
    template: str
    system: str
    versions: list[Version] = field(default_factory=list)
    current: int = 0

    @property
    def steps(self) -> list[Step]:
        return self.versions[self.current].steps if self.versions else []


@dataclass(frozen=True)
class Branch:
    """Continue `base` from its token `index`, written as candidate token `token_id`."""

    base: ReplyRecord
    index: int
    token_id: int

    def prefix_steps(self) -> list[Step]:
        """The base's steps before the branch point, then the chosen candidate in its place
        (its candidates are those of the replaced step)."""
        old = self.base.steps[self.index]
        cand = next((c for c in old.top if c.token_id == self.token_id), None)
        prob = cand.prob_before if cand is not None else 0.0
        new = dataclasses.replace(old, token_id=self.token_id, prob=prob, finish_reason=None)
        return [*self.base.steps[: self.index], new]


def record_of(
    u: TurnUpdate,
    steps: list[Step],
    settings: SamplingParams,
    views: Views,
    template: str,
    system: str,
    branch: Branch | None = None,
) -> ReplyRecord:
    """The record of a finished turn (`steps` from ui/live.py, after any branch prefix)."""
    text = u.chat[-1]["content"]
    if branch is None:
        version = Version(text, list(steps))
        return ReplyRecord(
            u.chat[:-1],
            list(u.prompt.ids),
            settings.replace(seed=u.seed),
            views,
            template,
            system,
            [version],
        )
    base = branch.base
    version = Version(text, [*branch.prefix_steps(), *steps])
    versions = [*base.versions, version]
    return dataclasses.replace(base, versions=versions, current=len(versions) - 1)


def piece_text(rt: Runtime, token_id: int) -> str:
    """A token as text in the reply: SentencePiece's ▁ as a space, a newline as ↵ (the
    HighlightedText would split a span at a real newline, and one click = one token)."""
    return rt.tokenizer.piece(token_id).replace("▁", " ").replace("<0x0A>", "↵")


def spans(rt: Runtime, record: ReplyRecord | None) -> list[tuple[str, str]]:
    """(token text, probability bin) per step: the HighlightedText value."""
    if record is None:
        return []
    return [(piece_text(rt, s.token_id), bin_of(s.prob)) for s in record.steps]


def colour_map() -> dict[str, str]:
    """Bin label -> colour, for the HighlightedText."""
    return {label: colour for (_, label), colour in zip(BINS, BIN_COLOURS, strict=True)}


def bin_of(p: float) -> str:
    return next(label for lowest, label in BINS if p >= lowest)


def record_outputs(rt: Runtime, record: ReplyRecord) -> dict[str, Any]:
    """What a finished reply sets in the inspector's widgets."""
    import gradio as gr

    n = len(record.versions)
    return {
        "tokens": spans(rt, record),
        "record": record,
        "inspect_info": HINT,
        "candidate": gr.update(choices=[], value=None),
        "branch_pick": gr.update(
            choices=[(f"version {i + 1}", i) for i in range(n)],
            value=record.current,
            visible=n > 1,
        ),
    }


def cleared() -> dict[str, Any]:
    import gradio as gr

    return {
        "tokens": [],
        "record": None,
        "inspect_info": HINT,
        "candidate": gr.update(choices=[], value=None),
        "branch_pick": gr.update(choices=[], value=None, visible=False),
    }


def views_at(rt: Runtime, record: ReplyRecord, index: int, views: Views) -> Trace | None:
    """The probe's view when step `index` was chosen: the model has read the prompt and the
    reply's tokens before it (one prefill), the step's token labels its position."""
    probe = make_probe(rt, views)
    if probe is None:
        return None
    steps = record.steps
    ids = [*record.prompt_ids, *(s.token_id for s in steps[:index])]
    model = rt.model
    with rt.slot, torch.inference_mode():
        if not model.caches():
            model.setup_caches(1)
        device = model.tok_embeddings.weight.device
        probe.begin(model, ids)
        try:
            tokens = torch.tensor([ids], device=device)  # (1, T)
            model(tokens, input_pos=torch.arange(len(ids), device=device), last_only=True)
            probe.on_step(steps[index])
        finally:
            probe.end(model)
    return probe.snapshot()


def describe_step(rt: Runtime, record: ReplyRecord, index: int) -> str:
    """Markdown: which token, its probability, and its candidates before/after sampling."""
    s = record.steps[index]
    lines = [
        f"**Token {index + 1} of {len(record.steps)}** `{rt.tokenizer.piece(s.token_id)}` "
        f"(id {s.token_id}) at position {s.position}: p = {s.prob:.4f} under the raw logits"
        + (f", ended the reply ({s.finish_reason})" if s.finish_reason else ""),
        "",
        "| candidate | before samplers | after samplers |",
        "|---|---|---|",
    ]
    for c in s.top:
        mark = " ← chosen" if c.token_id == s.token_id else ""
        lines.append(
            f"| `{rt.tokenizer.piece(c.token_id)}`{mark} | {c.prob_before:.4f} | "
            f"{c.prob_after:.4f} |"
        )
    return "\n".join(lines)


def candidate_choices(rt: Runtime, step: Step) -> list[tuple[str, int]]:
    """The step's candidates other than the chosen token, for the branch dropdown."""
    return [
        (f"{rt.tokenizer.piece(c.token_id)!r} (p {c.prob_before:.3f})", c.token_id)
        for c in step.top
        if c.token_id != step.token_id
    ]


def run_hooks(rt: Runtime, record: ReplyRecord, index: int) -> None:
    for hook in _HOOKS:
        hook(rt, record, index)

"""One chat turn, without gradio: history in, a stream of updates (chat, figures, status) out.

`run_turn` encodes the dialog (llama.chat), runs `llama.generate.generate` under the runtime's
generation slot with an optional Probe, and yields a `TurnUpdate` per generated token. It draws
nothing: the update carries the probe, which the caller may snapshot between two updates (the
model is idle then); ui/live.py does that in its own thread, so figures never hold text back.
`draw` turns a snapshot into the figures. With every probe-backed view switched off no Probe is
built, so the model runs its fast path untouched.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama.chat import Prompt, encode_chat
from llama.generate import NO_TOKEN, Step, generate, prompt_budget
from llama.probes import Probe, Trace
from llama.probes.why import ProbeGroup, WhyProbe, WhyTrace
from llama.sampling import SamplingParams
from ui import figures
from ui.runtime import Runtime
from ui.settings import pick_seed

Message = dict[str, str]
FIGURE_KEYS = ("attention", "probs", "rope", "kv")
PROBE_VIEWS = frozenset({"attention", "rope", "kv"})
PROBE_WINDOW = 48  # positions a probe keeps: bounds the figures' size and the trace's memory
ALL_LAYERS_UP_TO = 12  # models this shallow have every layer traced, so any layer can be shown
WHY_EVERY = 16  # tokens between two snapshots of the Why views (taken in the generation thread)


@dataclass(frozen=True)
class Views:
    """Which figures are on and what they show. head None = every head of the layer."""

    shown: frozenset[str] = frozenset(FIGURE_KEYS)
    layer: int = 0
    head: int | None = None
    mode: str = "heads"
    every: int = 8
    pace: float = 3.0  # after a redraw that took d s, the next waits >= pace * d s (0 = off)
    min_interval_s: float = 3.0  # the browser redraws 4 plots per update: 1-3 s of a busy renderer

    @property
    def needs_probe(self) -> bool:
        return bool(self.shown & PROBE_VIEWS)


class SessionControl:
    """One browser session's handle on its running reply: Stop sets `cancel`.

    It lives in the session's gradio State. gradio deep-copies a State's initial value for each
    new session; here a copy is a fresh control, so no two sessions share an Event.
    """

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.running = False  # a reply of this session is being generated
        self.export: Path | None = None  # the session's exported chat file (one at most)
        # The chat as the page showed it when Stop was clicked (ui/handlers.py `stop`): the
        # stopped reply is cut back to it. None: Stop not pressed, or not from the page.
        self.shown: list[Message] | None = None

    def arm(self) -> None:
        """Before a new reply: no Stop pending."""
        self.cancel.clear()
        self.shown = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SessionControl:
        return SessionControl()


@dataclass
class TurnUpdate:
    """What the UI shows after one step. probe: the turn's Probe (None with no probe-backed
    view on); snapshot it only before asking for the next update. step: the newest step
    that carries a token (None before the first)."""

    chat: list[Message]
    status: str
    prompt: Prompt
    seed: int
    step: Step | None = None
    done: bool = False
    notices: list[str] = field(default_factory=list)
    probe: Probe | None = None
    index: int = 0  # 0-based number of this update (one per generated step)
    # The Why views' newest snapshot (ui/why.py): taken in the generation thread every
    # WHY_EVERY tokens and at the end; the same object rides on the updates in between.
    why: WhyTrace | None = None
    # The step the figures show: `step`, except that an end-of-turn token (finish "eos") is
    # not part of the reply, so a finished reply's views stay on its last real token.
    view_step: Step | None = None


def build_prompt(
    rt: Runtime, history: list[Message], template: str, system: str, max_new_tokens: int
) -> Prompt:
    """The exact ids for the model: the dialog with a chat template ("own" or "chat"), or the
    running text (completion). history ends with the user message to answer. Older turns (or,
    in completion mode, older tokens) are dropped to leave room for the reply; the Prompt says
    how many.
    """
    budget = prompt_budget(rt.max_seq_len, max_new_tokens)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return encode_chat(rt.tokenizer, template, [*messages, *history], max_tokens=budget)


def make_probe(rt: Runtime, views: Views) -> Probe | None:
    """A Probe for the views that are on, or None (no hooks at all) when none needs one."""
    if not views.needs_probe:
        return None
    a = rt.args
    layers = None if a.n_layers <= ALL_LAYERS_UP_TO else {views.layer}
    return Probe(
        a,
        layers=layers,
        rope_head=views.head or 0,
        window=PROBE_WINDOW,
        token_pieces=rt.tokenizer.piece,
        attention="attention" in views.shown,
        rope="rope" in views.shown,
        kv_cache="kv" in views.shown,
    )


def draw(trace: Trace | None, step: Step | None, views: Views, ranks: int = 1) -> dict[str, Any]:
    """The figures that are on, from a probe snapshot and the latest step. ranks: processes
    the model is split over (the probe's KV-cache bytes are one rank's)."""
    out: dict[str, Any] = {}
    if "attention" in views.shown:
        out["attention"] = _attention(trace, views)
    if "probs" in views.shown:
        has_top = step is not None and step.top
        out["probs"] = (
            figures.token_probabilities(step, trace.label(step.position) if trace else None)
            if has_top
            else figures.empty_figure("Token probabilities appear with the first generated token")
        )
    if "rope" in views.shown:
        out["rope"] = (
            figures.rope_rotation(trace, head=trace.rope.head)
            if trace is not None and trace.rope is not None
            else figures.empty_figure("RoPE appears once the model runs")
        )
    if "kv" in views.shown:
        out["kv"] = (
            figures.kv_cache_growth(trace, ranks)
            if trace is not None and trace.kv is not None
            else figures.empty_figure("KV-cache growth appears once the model runs")
        )
    return out


def draw_json(
    trace: Trace | None, step: Step | None, views: Views, ranks: int = 1
) -> dict[str, str]:
    """`draw`, each figure as plotly JSON (what ui/live.py's drawing process sends back;
    this module imports no gradio, so that process stays light)."""
    return {k: fig.to_json() for k, fig in draw(trace, step, views, ranks).items()}


def _attention(trace: Trace | None, views: Views) -> Any:
    if trace is None or not trace.attention:
        return figures.empty_figure("Attention appears once the model runs")
    if views.layer not in trace.attention:
        return figures.empty_figure(
            f"Layer {views.layer} was not recorded in the last reply: regenerate to see it"
        )
    return figures.attention_by_group(trace, views.layer, head=views.head, mode=views.mode)


def run_turn(
    rt: Runtime,
    history: list[Message],
    settings: SamplingParams,
    views: Views,
    template: str,
    system: str,
    control: SessionControl | None = None,
    prefix: Sequence[int] = (),
    why: WhyProbe | None = None,
) -> Iterator[TurnUpdate]:
    """Answer the last user message of `history`, streaming.

    prefix: reply tokens taken as already written (the token inspector's "continue from
    here"): the model reads them after the prompt and the reply's text starts with them.

    Raises ChatError / SamplingError / TokenizerError before the first update when the dialog
    or the settings are invalid. The last update has done=True and its status says why the
    reply ended (eos, stop, length, context, cancelled). Holds rt.slot while generating.
    why: the Why views' probe (ui/why.py), run beside the figures' probe; None = off.
    """
    seed = pick_seed(settings)
    params = settings.replace(seed=seed)
    prompt = build_prompt(rt, history, template, system, params.max_new_tokens)
    figure_probe = make_probe(rt, views)
    probe = figure_probe if why is None else ProbeGroup(figure_probe, why)
    cancel = control.cancel if control is not None else None
    reply: Message = {"role": "assistant", "content": rt.tokenizer.decode(list(prefix))}
    junction = _Junction(rt.tokenizer, prefix)
    if prefix:
        prompt = dataclasses.replace(prompt, ids=[*prompt.ids, *prefix])
    last_real: Step | None = None  # the newest step that carries a token
    last_text: Step | None = None  # ... and is part of the reply (not its end-of-turn token)
    why_trace: WhyTrace | None = None
    notices: list[str] = []
    with rt.slot:
        steps = generate(rt.model, rt.tokenizer, prompt, params, probe=probe, cancel=cancel)
        for i, step in enumerate(steps):
            reply["content"] += junction.text(step)
            last_real = step if step.token_id != NO_TOKEN else last_real
            ends_turn = step.finish_reason == "eos" and last_text is not None
            last_text = last_real if not ends_turn else last_text
            if step.notice:
                notices.append(step.notice)
            done = step.finish_reason is not None
            if why is not None and (done or i % WHY_EVERY == 0):
                why_trace = why.snapshot()
            yield TurnUpdate(
                [*history, dict(reply)],
                status_text(rt, prompt, step, i + (step.token_id != NO_TOKEN), seed, notices),
                prompt,
                seed,
                last_real,
                done,
                list(notices),
                figure_probe,
                i,
                why_trace,
                last_text,
            )


class _Junction:
    """The first new token's text after a prefix. The stream decoder starts afresh after
    the prefix, so a SentencePiece word piece would lose its leading space: decoding the
    prefix with that token gives the text a whole-reply decode would have."""

    def __init__(self, tok: Any, prefix: Sequence[int]) -> None:
        self.tok, self.prefix, self.pending = tok, list(prefix), bool(prefix)

    def text(self, step: Step) -> str:
        if not self.pending or not step.text or step.token_id == NO_TOKEN:
            return step.text
        self.pending = False
        head = self.tok.decode(self.prefix)
        joined = self.tok.decode([*self.prefix, step.token_id])
        tail = joined[len(head) :] if joined.startswith(head) else ""
        return tail if tail.endswith(step.text) and len(tail) > len(step.text) else step.text


def status_text(
    rt: Runtime, prompt: Prompt, step: Step, n_tokens: int, seed: int, notices: list[str]
) -> str:
    """The status line: speed, time to first token, context and KV cache use, seed, why the
    reply ended and any notice; then the model (name, shape, device, dtype, 8-bit)."""
    parts = [f"{n_tokens} tokens"]
    if step.ttft_s is not None:
        decode_s = step.elapsed_s - step.ttft_s
        rate = (n_tokens - 1) / decode_s if n_tokens > 1 and decode_s > 0 else None
        parts.append(f"{rate:.1f} tok/s" if rate is not None else "– tok/s")
        parts.append(f"TTFT {step.ttft_s * 1000:.0f} ms")
    used = min(step.position + 1, rt.max_seq_len)
    parts.append(f"context {used} / {rt.max_seq_len}")
    parts.append(
        f"KV cache {format_bytes(rt.kv_bytes(used))} of {format_bytes(rt.kv_bytes(rt.max_seq_len))}"
    )
    if rt.ranks > 1:  # tensor-parallel: each rank holds its KV heads' share
        each = rt.kv_bytes(used, per_rank=True), rt.kv_bytes(rt.max_seq_len, per_rank=True)
        parts[-1] += f" ({rt.ranks} ranks × {format_bytes(each[0])} of {format_bytes(each[1])})"
    parts.append(f"seed {seed}")
    if step.finish_reason:
        parts.append(f"finished: {step.finish_reason}")
    line = " · ".join(parts)
    if notices:
        line += "  \n⚠ " + "; ".join(notices)
    return f"{line}  \n{rt.describe()}"


def format_bytes(n: int) -> str:
    """Bytes with a binary unit: 12800 -> "12.5 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"

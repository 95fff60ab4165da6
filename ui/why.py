"""The "Why" tab: logit lens, attention sinks, what drove a token, and what-if replays.

Capture: with any of WHY_VIEWS on, `respond` (ui/handlers.py) runs a WhyProbe beside the
figures' probe and sends a `WhyRecord` into the session's State at every redraw; its change
event redraws this tab while the reply streams. With them off no probe is built (no cost).
Replays, sampler comparisons and gradient x input run the model: they hold the runtime's
slot and share the model's concurrency group with `respond`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from llama.probes.ablation import (
    Ablation,
    AblationError,
    compare_samplers,
    group_heads,
    replay,
    reply_ids,
)
from llama.probes.attribution import AttributionError, grad_x_input
from llama.probes.lens import default_lens_every
from llama.probes.why import WhyProbe, WhyTrace
from llama.sampling import SamplingError, SamplingParams
from ui import why_figs
from ui.plot_style import empty_figure
from ui.runtime import Runtime
from ui.settings import SLIDERS

WHY_VIEWS = {"lens": "Logit lens", "sinks": "Attention sinks", "attribution": "What drove it"}
RESIZE_JS = "() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }"
WHY_WINDOW = 128  # positions the Why probe keeps (lens columns, sink and attribution rows)
INTRO = (
    "Why did the model say that? Switch a view on, send a message in the Playground, then "
    "pick a reply token here or click it in the Playground's token inspector. Views that are "
    "off capture nothing and cost nothing."
)

__all__ = ["WHY_VIEWS", "WhyProbe", "WhyRecord", "build_why_tab", "make_why_probe", "why_record"]


def make_why_probe(rt: Runtime, shown: list[str] | None, lens_every: Any = None) -> WhyProbe | None:
    """The probe for the Why views that are on, or None (no capture) when none is.
    lens_every: the lens runs at layers 0, k, 2k, ... and the last (None: about four)."""
    keys = set(shown or []) & set(WHY_VIEWS)
    if not keys:
        return None
    every = None if lens_every in (None, "") else max(1, int(lens_every))
    return WhyProbe(
        rt.args,
        lens="lens" in keys,
        sinks="sinks" in keys,
        attribution="attribution" in keys,
        window=WHY_WINDOW,
        token_pieces=rt.tokenizer.piece,
        lens_every=every,
    )


class WhyRecord:
    """The last reply's Why snapshot with what a replay needs: the exact prompt ids and the
    sampling settings with the seed used. A plain class: gradio tells States apart by
    hash, and each new record is a new object, so every redraw fires the State's change."""

    def __init__(self, trace: WhyTrace, prompt_ids: list[int], params: SamplingParams) -> None:
        self.trace, self.prompt_ids, self.params = trace, prompt_ids, params

    @property
    def reply(self) -> list[int]:
        return self.trace.ids[self.trace.prompt_len :]


def why_record(update: Any, settings: SamplingParams) -> Any:
    """The State value for a TurnUpdate: a WhyRecord at redraws with a Why probe, else skip."""
    if getattr(update, "why", None) is None:
        return gr.skip()
    return WhyRecord(update.why, list(update.prompt.ids), settings.replace(seed=update.seed))


def _need(record: WhyRecord | None) -> WhyRecord:
    if record is None:
        raise gr.Error("No reply analysed yet: switch a Why view on and send a message.")
    return record


def _position(record: WhyRecord, position: Any) -> int:
    choices = [p for _, p in why_figs.token_choices(record.trace)]
    if position in (None, "") or int(position) not in choices:
        raise gr.Error("Pick a reply token first (the Token list above).")
    return int(position)


def inspector_position(record: WhyRecord | None, reply: Any, index: int | None) -> int | None:
    """The Why query position of token `index` of the inspector's reply (a ReplyRecord), or
    None when `record` holds no view of that very token (another reply or version, views
    off, or older than the Why window)."""
    if record is None or reply is None or index is None or not 0 <= index < len(reply.steps):
        return None
    step = reply.steps[index]
    trace = record.trace
    if not step.position < len(trace.ids) or trace.ids[step.position] != step.token_id:
        return None
    if trace.ids[: len(reply.prompt_ids)] != list(reply.prompt_ids):
        return None  # the same token id by chance, after another prompt
    pos = step.position - 1
    return pos if pos in {p for _, p in why_figs.token_choices(trace)} else None


class WhyHandlers:
    """Callbacks of the Why tab for one Runtime (no state of their own)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def redraw(self, record: WhyRecord | None, position: Any) -> tuple[Any, ...]:
        """Token list and every figure from the newest record (the selection kept)."""
        trace = record.trace if record is not None else None
        choices = why_figs.token_choices(trace)
        values = [p for _, p in choices]
        pos = int(position) if position not in (None, "") and int(position) in values else None
        pos = pos if pos is not None else (values[-1] if values else None)
        return (
            gr.update(choices=choices, value=pos),
            why_figs.lens_heatmap(trace),
            *self.selected(record, pos),
            why_figs.sink_heads_figure(trace),
        )

    def selected(self, record: WhyRecord | None, position: Any) -> tuple[Any, Any]:
        """The per-token figures: the chosen token through the layers, and what drove it."""
        trace = record.trace if record is not None else None
        pos = None if position in (None, "") else int(position)
        return why_figs.lens_token_line(trace, pos), why_figs.attribution_figure(trace, pos)

    def from_inspector(
        self, record: WhyRecord | None, reply: Any, evt: gr.SelectData
    ) -> tuple[Any, Any, Any]:
        """A token clicked in the token inspector (ui/inspector.py) becomes this tab's token:
        the picker, the lens line and the attribution follow (untouched when the Why record
        does not hold that token: views off, or out of its window)."""
        index = evt.index if isinstance(evt.index, int) else None
        pos = inspector_position(record, reply, index)
        if pos is None:
            return gr.skip(), gr.skip(), gr.skip()
        return gr.update(value=pos), *self.selected(record, pos)

    def gradient(self, record: WhyRecord | None, position: Any) -> Any:
        """Attribution with gradient x input added (one backward pass)."""
        record = _need(record)
        pos = _position(record, position)
        try:
            with self.rt.slot:  # the model must not be mid-generation (observers, caches)
                grad = grad_x_input(self.rt.model, record.trace.ids, pos + 1)
        except AttributionError as exc:
            raise gr.Error(str(exc)) from None
        return why_figs.attribution_figure(record.trace, pos, grad)

    def what_if(self, record: WhyRecord | None, position: Any, layer: Any, target: Any) -> Any:
        """Replay the reply with a head or GQA group zeroed from the chosen token on."""
        record = _need(record)
        pos = _position(record, position)
        kind, index = str(target or "h:0").split(":")
        a = self.rt.args
        try:
            heads = group_heads(a, int(index)) if kind == "g" else [int(index)]
            ablation = Ablation(int(layer or 0), tuple(heads), start=pos)
            ablation.check(a)
            with self.rt.slot:
                out = replay(
                    self.rt.model,
                    self.rt.tokenizer,
                    record.prompt_ids,
                    record.params,
                    record.reply,
                    ablation,
                )
        except AblationError as exc:
            raise gr.Error(str(exc)) from None
        change = (
            f"{ablation.describe(a)} is zeroed from reply token {pos + 1 - record.trace.prompt_len}"
        )
        return why_figs.replay_figure(
            self._labels(out.original),
            self._labels(out.replayed),
            out.diverge,
            out.p_original,
            out.p_changed,
            change,
        )

    def compare(self, record: WhyRecord | None, temperature: Any, top_p: Any, top_k: Any) -> Any:
        """The last reply's prompt and seed under its settings and under the ones given."""
        record = _need(record)
        try:
            other = record.params.replace(
                temperature=float(temperature), top_p=float(top_p), top_k=int(top_k)
            )
            with self.rt.slot:
                cmp = compare_samplers(
                    self.rt.model, self.rt.tokenizer, record.prompt_ids, record.params, other
                )
        except (AblationError, SamplingError) as exc:
            raise gr.Error(str(exc)) from None
        names = (_describe(record.params), _describe(other))
        return why_figs.sampler_figure(
            self._labels(reply_ids(cmp.steps_a)),
            self._labels(reply_ids(cmp.steps_b)),
            cmp.differ,
            names,
        )

    def _labels(self, ids: list[int]) -> list[str]:
        from llama.probes.views import token_label

        return [token_label(self.rt.tokenizer.piece(i)) for i in ids]


def _describe(p: SamplingParams) -> str:
    return f"T {p.temperature:g} · top-p {p.top_p:g} · top-k {p.top_k}"


# Components and wiring ---------------------------------------------------------------------
def build_why_tab(rt: Runtime) -> dict[str, Any]:
    """The "Why" tab and its components (call inside the demo's Blocks, among its tabs);
    wire them with `wire_why`."""
    ui: dict[str, Any] = {"why": gr.State(None)}
    with gr.Tab("Why", elem_id="why-tab") as ui["why_tab"]:
        _why_components(rt, ui)
    return ui


def _why_components(rt: Runtime, ui: dict[str, Any]) -> None:
    a = rt.args
    gr.Markdown(INTRO, elem_id="why-intro")
    with gr.Row(equal_height=True):
        ui["why_views"] = gr.CheckboxGroup(
            [(v, k) for k, v in WHY_VIEWS.items()],
            value=[],
            label="Why views (off = no cost)",
            elem_id="why-views",
            scale=3,
        )
        ui["why_lens_every"] = gr.Slider(
            1,
            a.n_layers,
            value=default_lens_every(a.n_layers),
            step=1,
            label="Lens every k-th layer (and the last)",
            info="each lensed layer costs one output projection per token",
            elem_id="why-lens-every",
            scale=2,
        )
        ui["why_token"] = gr.Dropdown([], label="Reply token", elem_id="why-token", scale=2)
    blank = empty_figure("Switch a view on and send a message.")
    ui["why_lens"] = gr.Plot(blank, show_label=False, elem_id="why-lens")
    ui["why_line"] = gr.Plot(blank, show_label=False, elem_id="why-line")
    ui["why_sinks"] = gr.Plot(blank, show_label=False, elem_id="why-sinks")
    ui["why_attr"] = gr.Plot(blank, show_label=False, elem_id="why-attribution")
    ui["why_grad"] = gr.Button("Add gradient × input for this token", size="sm", elem_id="why-grad")
    with gr.Accordion("What if", open=True, elem_id="why-what-if"):
        with gr.Row(equal_height=True):
            ui["why_layer"] = gr.Dropdown(
                [(f"layer {i}", i) for i in range(a.n_layers)],
                value=0,
                label="Layer",
                elem_id="why-layer",
            )
            targets = [(f"head {h} (group {h // a.n_rep})", f"h:{h}") for h in range(a.n_heads)]
            if a.n_rep > 1:
                targets += [
                    (f"GQA group {g} (heads {g * a.n_rep}-{(g + 1) * a.n_rep - 1})", f"g:{g}")
                    for g in range(a.kv_heads)
                ]
            ui["why_target"] = gr.Dropdown(targets, value="h:0", label="Zero", elem_id="why-target")
            ui["why_replay"] = gr.Button("Replay from this token", elem_id="why-replay")
        ui["why_replay_plot"] = gr.Plot(blank, show_label=False, elem_id="why-replay-plot")
        with gr.Row(equal_height=True):
            ui["why_temp"] = gr.Slider(
                0, 2, value=1.2, step=0.05, label="Other temperature", elem_id="why-temp"
            )
            ui["why_top_p"] = gr.Slider(
                0.05,
                1,
                value=SLIDERS["top_p"].default,
                step=0.05,
                label="Other top-p",
                elem_id="why-top-p",
            )
            ui["why_top_k"] = gr.Slider(
                0, 200, value=0, step=1, label="Other top-k", elem_id="why-top-k"
            )
            ui["why_compare"] = gr.Button("Compare samplers", elem_id="why-compare")
        ui["why_compare_plot"] = gr.Plot(blank, show_label=False, elem_id="why-compare-plot")


def wire_why(rt: Runtime, ui: dict[str, Any]) -> None:
    """Events of the Why tab; the model-running ones in the model's concurrency group."""
    h = WhyHandlers(rt)
    free = {"concurrency_limit": None, "show_progress": "hidden", "api_visibility": "private"}
    model = {"concurrency_id": rt.concurrency_id, "concurrency_limit": 1}
    record, token = ui["why"], ui["why_token"]
    figures = [token, ui["why_lens"], ui["why_line"], ui["why_attr"], ui["why_sinks"]]
    ui["why"].change(h.redraw, [record, token], figures, **free)
    # Figures drawn while the tab was hidden got plotly's default width: once it shows, a
    # window resize lets their responsive layout fit the column (no server round trip).
    ui["why_tab"].select(None, js=RESIZE_JS, queue=False)
    token.input(h.selected, [record, token], [ui["why_line"], ui["why_attr"]], **free)
    # A click in the Playground's token inspector picks the same token here.
    ui["tokens"].select(
        h.from_inspector,
        [record, ui["record"]],
        [token, ui["why_line"], ui["why_attr"]],
        **free,
    )
    ui["why_grad"].click(
        h.gradient, [record, token], [ui["why_attr"]], api_name="why_gradient", **model
    )
    ui["why_replay"].click(
        h.what_if,
        [record, token, ui["why_layer"], ui["why_target"]],
        [ui["why_replay_plot"]],
        api_name="why_replay",
        **model,
    )
    ui["why_compare"].click(
        h.compare,
        [record, ui["why_temp"], ui["why_top_p"], ui["why_top_k"]],
        [ui["why_compare_plot"]],
        api_name="why_compare",
        **model,
    )

"""The Why tab's callbacks without a browser: the record respond sends, the figures, replays."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go
import pytest

from llama.probes.lens import lens_layers
from llama.probes.why import WhyTrace
from tests.test_handlers import h, rt, widgets  # noqa: F401 (fixtures)
from ui.handlers import Handlers
from ui.inspector import ReplyRecord
from ui.outputs import OUTPUT_KEYS
from ui.turn import SessionControl
from ui.why import WHY_VIEWS, WhyHandlers, WhyRecord, inspector_position, make_why_probe

WHY_INDEX = 11  # respond's outputs: ..., last trace, the Why record, text box


def _respond(h: Handlers, why: list[str] | None, **over) -> list:  # noqa: F811
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    return list(h.respond(history, control, *widgets(h.rt, **over), why))


def test_views_off_build_no_probe_and_send_no_record(h: Handlers) -> None:  # noqa: F811
    assert make_why_probe(h.rt, []) is None and make_why_probe(h.rt, None) is None
    outs = _respond(h, [])
    assert all(not isinstance(o[WHY_INDEX], WhyRecord) for o in outs)
    assert h.rt.model.residual_observer is None


def test_record_streams_and_redraws_every_figure(h: Handlers) -> None:  # noqa: F811
    outs = _respond(h, list(WHY_VIEWS), max_new_tokens=8, seed=3)
    records = [o[WHY_INDEX] for o in outs if isinstance(o[WHY_INDEX], WhyRecord)]
    assert len(records) >= 2  # the first token and the last, at least
    last = records[-1]
    assert isinstance(last.trace, WhyTrace) and len(last.reply) == 8
    assert last.params.seed == 3 and last.prompt_ids == last.trace.ids[: last.trace.prompt_len]
    assert h.rt.model.residual_observer is None and h.rt.model.layers[0].attention.observer is None
    w = WhyHandlers(h.rt)
    token, lens, line, attr, sinks = w.redraw(last, None)
    assert token["value"] == last.trace.prompt_len + 7 - 1  # the newest reply token by default
    assert len(token["choices"]) == 8
    for fig in (lens, line, attr, sinks):
        assert isinstance(fig, go.Figure) and fig.layout.title.text
    assert "attention × ‖value‖" in attr.layout.annotations[0].text  # the method is named
    picked = token["choices"][2][1]
    assert w.redraw(last, picked)[0]["value"] == picked  # a selection survives a redraw
    grad = w.gradient(last, picked)
    assert "gradient × input" in grad.layout.annotations[-1].text


def test_replay_and_sampler_comparison(h: Handlers) -> None:  # noqa: F811
    outs = _respond(h, ["lens"], max_new_tokens=10, seed=5, temperature=0.9)
    last = [o[WHY_INDEX] for o in outs if isinstance(o[WHY_INDEX], WhyRecord)][-1]
    w = WhyHandlers(h.rt)
    start = last.trace.prompt_len + 3 - 1  # from reply token 3
    fig = w.what_if(last, start, 2, "g:0")
    original, replayed = fig.data[0].text  # the token strip: original row, replay row
    assert [t for t in original if t] != [] and original[:3] == replayed[:3]
    assert "layer 2, GQA group 0 (heads 0-3) is zeroed from reply token 3" in fig.layout.title.text
    same = w.compare(last, 0.9, last.params.top_p, last.params.top_k)
    assert "identical" in same.layout.title.text


def test_bad_requests_are_named(h: Handlers) -> None:  # noqa: F811
    w = WhyHandlers(h.rt)
    with pytest.raises(gr.Error, match="No reply analysed yet"):
        w.gradient(None, 3)
    outs = _respond(h, ["attribution"], max_new_tokens=4)
    last = [o[WHY_INDEX] for o in outs if isinstance(o[WHY_INDEX], WhyRecord)][-1]
    with pytest.raises(gr.Error, match="Pick a reply token"):
        w.what_if(last, 0, 0, "h:0")
    with pytest.raises(gr.Error, match=r"layer: expected 0..5, found 9"):
        w.what_if(last, last.trace.prompt_len, 9, "h:0")


def test_lens_every_limits_the_lensed_layers(h: Handlers) -> None:  # noqa: F811
    """The Why tab's "lens every" reaches the probe: fewer heatmap rows, the last kept."""
    n = h.rt.args.n_layers
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    outs = list(h.respond(history, control, *widgets(h.rt, max_new_tokens=4), ["lens"], n - 1))
    last = [o[WHY_INDEX] for o in outs if isinstance(o[WHY_INDEX], WhyRecord)][-1]
    assert all(c.layers == (0, n - 1) for c in last.trace.lens) and n > 2
    heatmap = WhyHandlers(h.rt).redraw(last, None)[1]
    assert list(heatmap.data[0].y) == ["layer 0", f"layer {n - 1}"]
    assert f"2 of {n} layers" in heatmap.layout.title.text
    assert make_why_probe(h.rt, ["lens"], None).lens_layers == lens_layers(n)


def test_a_token_clicked_in_the_inspector_is_picked_in_the_why_tab(h: Handlers) -> None:  # noqa: F811
    outs = _respond(h, ["lens", "attribution"], max_new_tokens=6, seed=4)
    why = [o[WHY_INDEX] for o in outs if isinstance(o[WHY_INDEX], WhyRecord)][-1]
    reply = [o[OUTPUT_KEYS.index("record")] for o in outs][-1]
    assert isinstance(reply, ReplyRecord) and len(reply.steps) == 6
    w = WhyHandlers(h.rt)
    for index in (0, 3, 5):
        click = SimpleNamespace(index=index)
        token, line, attr = w.from_inspector(why, reply, click)
        step = reply.steps[index]
        assert token["value"] == step.position - 1 == why.trace.prompt_len + index - 1
        assert why.trace.ids[step.position] == step.token_id
        same_line, same_attr = w.selected(why, step.position - 1)
        assert line.to_dict() == same_line.to_dict() and attr.to_dict() == same_attr.to_dict()
    # Another reply (a different prompt) or no Why record: the tab is left as it is.
    other = dataclasses.replace(reply, prompt_ids=[*reply.prompt_ids[:-1], 0])
    assert all(isinstance(v, type(gr.skip())) for v in w.from_inspector(why, other, click))
    assert all(isinstance(v, type(gr.skip())) for v in w.from_inspector(None, reply, click))
    assert inspector_position(why, reply, len(reply.steps)) is None

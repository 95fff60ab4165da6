"""ui/figures.py and ui/rope_lab.py: panels, traces, labels and values (no rendering)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from llama.config import ModelArgs
from llama.generate import Candidate, Step
from llama.model import Transformer
from llama.probes import Probe, Trace
from llama.rope import rope_frequencies
from tests.conftest import TINY_CONFIGS
from tests.test_probes import drive
from ui import figures as F
from ui.rope_lab import encodings, offset_deviation, relative_errors

PIECES = {1: "<s>", 2: " the", 3: "\n"}


pytestmark = pytest.mark.usefixtures("one_thread")


def traced(args: ModelArgs, layers: set[int] | None = None, window: int = 64) -> Trace:
    torch.manual_seed(0)
    model = Transformer(args).eval()
    model.setup_caches(1)
    probe = Probe(
        args,
        layers=layers or {0, 1},
        rope_head=1,
        window=window,
        token_pieces=lambda i: PIECES.get(i, f"t{i}"),
    )
    drive(model, probe, [1, 2, 3, 7, 2], n_new=5)
    return probe.snapshot()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def trace(request: pytest.FixtureRequest) -> Trace:
    return traced(TINY_CONFIGS[request.param])


def _title(fig: go.Figure) -> str:
    return fig.layout.title.text or ""


def _is_empty(fig: go.Figure, words: str) -> bool:
    return not fig.data and any(words in a.text for a in fig.layout.annotations)


# Attention -----------------------------------------------------------------------------------
def test_attention_one_panel_per_group_heads_side_by_side(trace: Trace) -> None:
    args, view = trace.args, trace.attention[1]
    fig = F.attention_by_group(trace, 1)
    assert len(fig.data) == args.kv_heads
    assert all(isinstance(t, go.Heatmap) for t in fig.data)
    t_q, t_kv = len(view.query_positions), len(view.key_positions)
    for g, hm in enumerate(fig.data):
        z = np.asarray(hm.z, dtype=float)
        assert z.shape == (t_q, args.n_rep * (t_kv + 1) - 1)
        for r in range(args.n_rep):  # head g*n_rep + r sits in block r
            block = z[:, r * (t_kv + 1) : r * (t_kv + 1) + t_kv]
            expected = view.probs[g * args.n_rep + r].numpy()
            lower = np.tril(np.ones((t_q, t_kv), dtype=bool))
            np.testing.assert_allclose(block[lower], expected[lower], rtol=1e-6)
            assert np.isnan(block[~lower]).all()  # future keys are blank, not 0
        heads = ", ".join(str(g * args.n_rep + r) for r in range(args.n_rep))
        what = f"head {g} alone" if args.n_rep == 1 else f"heads {heads}"
        assert f"group {g} (KV head {g}): {what}" in fig.layout.annotations[g].text
        assert list(hm.y) == [
            f"{trace.label(p)} @{p}".replace("<", "&lt;").replace(">", "&gt;")
            for p in view.query_positions
        ]
        assert "%{z:.6f}" in hm.hovertemplate
    assert fig.layout.coloraxis.colorscale is not None and fig.layout.coloraxis.cmin == 0
    rects = [s for s in fig.layout.shapes if s.name == "newest query"]
    assert len(rects) == args.kv_heads
    assert all(s.y0 == t_q - 1.5 and s.y1 == t_q - 0.5 for s in rects)


def test_attention_title_is_honest_about_the_attention_kind(trace: Trace) -> None:
    title = _title(F.attention_by_group(trace, 0))
    kind = trace.args.attention_kind
    expected = {
        "MHA": "MHA: groups of one head",
        "GQA": "GQA: 4 query heads in 2 groups of 2",
        "MQA": "MQA: one group, all 4 query heads share a single KV head",
    }[kind]
    assert expected in title and "Layer 0" in title


def test_attention_token_labels_escape_markup() -> None:
    trace = traced(TINY_CONFIGS["gqa"])
    fig = F.attention_by_group(trace, 0)
    assert fig.layout.yaxis.ticktext[0] == "&lt;s&gt;"  # '<s>' would be read as a tag
    assert "␣the" in fig.layout.yaxis.ticktext and "↵" in fig.layout.yaxis.ticktext
    assert "&lt;s&gt;" in fig.layout.xaxis.ticktext


def test_attention_mean_spread_and_single_head_modes() -> None:
    trace = traced(TINY_CONFIGS["gqa"])
    view = trace.attention[0]
    lower = np.tril(np.ones(view.probs.shape[1:], dtype=bool))
    mean = F.attention_by_group(trace, 0, mode="mean")
    assert len(mean.data) == 2 and "spread (max-min)" in mean.data[0].hovertemplate
    for g in range(2):
        z = np.asarray(mean.data[g].z, dtype=float)
        np.testing.assert_allclose(z[lower], view.group_mean[g].numpy()[lower], rtol=1e-6)
        spread = np.asarray(mean.data[g].customdata, dtype=float)[..., 0]
        np.testing.assert_allclose(spread, view.group_spread[g].numpy(), rtol=1e-6)
    spread_fig = F.attention_by_group(trace, 0, mode="spread")
    z = np.asarray(spread_fig.data[1].z, dtype=float)
    np.testing.assert_allclose(z[lower], view.group_spread[1].numpy()[lower], rtol=1e-6)
    one = F.attention_by_group(trace, 0, head=3)
    assert len(one.data) == 1 and "head 3" in one.layout.annotations[0].text
    z = np.asarray(one.data[0].z, dtype=float)
    np.testing.assert_allclose(z[lower], view.probs[3].numpy()[lower], rtol=1e-6)


def test_attention_hover_reports_mass_before_a_cut_window() -> None:
    full = traced(TINY_CONFIGS["gqa"])
    assert F.attention_by_group(full, 0).data[0].customdata is None  # nothing cut: no payload
    cut = traced(TINY_CONFIGS["gqa"], window=4)
    view = cut.attention[0]
    hm = F.attention_by_group(cut, 0).data[1]  # group 1: heads 2 and 3
    outside = np.asarray(hm.customdata, dtype=float)[..., 0]
    np.testing.assert_allclose(outside[:, 0], view.outside[2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(outside[:, 5], view.outside[3].numpy(), rtol=1e-6)
    assert "mass before the window: %{customdata[0]:.4f}" in hm.hovertemplate
    mean = F.attention_by_group(cut, 0, mode="mean").data[0]
    assert "%{customdata[1]:.4f}" in mean.hovertemplate


def test_attention_bad_or_missing_input() -> None:
    trace = traced(TINY_CONFIGS["gqa"], layers={1})
    assert _is_empty(F.attention_by_group(trace, 0), "traced layers: [1]")
    with pytest.raises(ValueError, match="mode"):
        F.attention_by_group(trace, 1, mode="bogus")
    with pytest.raises(ValueError, match="head"):
        F.attention_by_group(trace, 1, head=4)


def test_mha_with_many_heads_lays_out_a_grid() -> None:
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, vocab_size=97, multiple_of=16, max_seq_len=32)
    fig = F.attention_by_group(traced(args, layers={0}), 0)
    assert len(fig.data) == 8 and fig.layout.xaxis8.anchor == "y8"
    assert "groups of one head" in _title(fig) and "8 query heads, 8 KV heads" in _title(fig)


# RoPE ----------------------------------------------------------------------------------------
def test_rope_rotation_panels_and_values(trace: Trace) -> None:
    rope = trace.rope
    assert rope is not None
    fig = F.rope_rotation(trace, head=1)
    polar = [t for t in fig.data if isinstance(t, go.Scatterpolar)]
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    lines = [t for t in fig.data if isinstance(t, go.Scatter)]
    n_pairs = trace.args.head_dim // 2
    pairs = sorted({0, n_pairs // 8, n_pairs // 3, n_pairs - 1})
    assert len(polar) == 3 * len(pairs)
    assert len(bars) == 1 and list(bars[0].x) == list(range(n_pairs))
    expected = [a % (2 * math.pi) for a in rope.angles.tolist()]
    np.testing.assert_allclose(bars[0].y, expected, rtol=1e-6)
    assert [t.name for t in lines] == ["with RoPE", "without RoPE"]
    np.testing.assert_allclose(lines[0].y, rope.scores_rope.numpy(), rtol=1e-6)
    np.testing.assert_allclose(lines[1].y, rope.scores_plain.numpy(), rtol=1e-6)
    assert list(lines[0].x) == [rope.position - p for p in rope.key_positions]
    title = _title(fig)
    assert f"position {rope.position}" in title and "head 1" in title
    assert f"{float(rope.q_raw.norm()):.5f} before, {float(rope.q_rot.norm()):.5f} after" in title
    assert fig.layout.polar is not None


def test_rope_rotation_without_data_or_for_another_head() -> None:
    trace = traced(TINY_CONFIGS["mqa"])
    assert _is_empty(F.rope_rotation(trace, head=0), "traced head 1")
    empty = Trace(trace.args, [], [], {}, None, None, None, 0)
    assert _is_empty(F.rope_rotation(empty), "No RoPE data")


# KV cache ------------------------------------------------------------------------------------
def test_kv_cache_growth_traces_and_lines(trace: Trace) -> None:
    kv, args = trace.kv, trace.args
    assert kv is not None
    fig = F.kv_cache_growth(trace)
    stacked = [t for t in fig.data if t.stackgroup == "used"]
    assert len(stacked) == args.n_layers
    assert list(stacked[0].x) == kv.positions == [5, 6, 7, 8, 9]
    cf = [t for t in fig.data if t.stackgroup != "used"]
    assert len(cf) == 2 * len(kv.counterfactual)  # zoomed and full panels
    names = [t.name for t in cf if t.showlegend]
    assert any("this model" in n and f"H_kv={args.kv_heads}" in n for n in names)
    assert any(n.startswith("MHA") for n in names) and any(n.startswith("MQA") for n in names)
    full = next(t for t in cf if t.showlegend and t.name.startswith("MQA"))
    itemsize = 4
    for x, y in zip(full.x, full.y, strict=True):
        assert y == 2 * args.n_layers * 1 * args.head_dim * x * itemsize
    assert full.x[-1] == args.max_seq_len
    shapes = fig.layout.shapes
    capacity = 2 * args.n_layers * args.kv_heads * args.head_dim * args.max_seq_len * itemsize
    assert any(s.y0 == s.y1 == capacity for s in shapes)
    assert any(s.x0 == s.x1 == 9 for s in shapes) and any(
        s.x0 == s.x1 == args.max_seq_len for s in shapes
    )
    assert f"9 of {args.max_seq_len} positions" in _title(fig)
    assert F.kv_cache_growth(Trace(args, [], [], {}, None, None, None, 0)).data == ()


# Token probabilities -------------------------------------------------------------------------
def _step(chosen: int) -> Step:
    top = [
        Candidate(5, " the", 0.6, 0.75),
        Candidate(9, "<0x0A>", 0.2, 0.25),
        Candidate(11, " the", 0.1, 0.0),
    ]
    return Step(chosen, "x", 12, 0.6 if chosen == 5 else 0.2, top, 0.1, 0.05)


def test_token_probabilities_before_after_and_chosen() -> None:
    fig = F.token_probabilities(_step(9))
    assert len(fig.data) == 2 and all(isinstance(t, go.Bar) for t in fig.data)
    before, after = fig.data
    assert list(before.x) == ["␣the", "&lt;0x0A&gt;", "␣the #11"]  # unique, escaped
    assert list(before.y) == [0.6, 0.2, 0.1] and list(after.y) == [0.75, 0.25, 0.0]
    colours = list(after.marker.line.color)
    assert colours[1] == F.HIGHLIGHT and colours[0] != F.HIGHLIGHT
    assert after.customdata[2][1] == "filtered out" and after.customdata[1][1] == "chosen"
    assert "position 12" in _title(fig) and "p = 0.2000" in _title(fig)


def test_token_probabilities_without_a_step() -> None:
    assert _is_empty(F.token_probabilities(None), "Generate a reply")
    cancelled = Step(-1, "", 4, 0.0, [], 0.1, None, "cancelled")
    assert _is_empty(F.token_probabilities(cancelled), "cancelled")
    assert _is_empty(F.empty_figure("nothing here"), "nothing here")


# RoPE lab ------------------------------------------------------------------------------------
def test_rope_lab_figures() -> None:
    args = ModelArgs(
        dim=128, n_layers=1, n_heads=4, vocab_size=97, max_seq_len=256, rope_theta=500000.0
    )
    figs = F.rope_lab(args)
    assert set(figs) == {"encodings", "relative", "spectrum"}
    enc = figs["encodings"]
    assert len(enc.data) == 8 and all(isinstance(t, go.Heatmap) for t in enc.data)
    titles = [a.text for a in enc.layout.annotations]
    assert titles[:4] == [
        "binary: bits of m",
        "sin only: sin(m·θ_i)",
        "sin + cos: sin, cos(m·θ_i)",
        "rotary: R_m q",
    ]
    rel = figs["relative"]
    table = next(t for t in rel.data if isinstance(t, go.Table))
    assert all(float(e) < 1e-4 for e in table.cells.values[3])
    spec = figs["spectrum"]
    np.testing.assert_allclose(spec.data[0].y, rope_frequencies(32, 500000.0).numpy())
    assert "rope_theta=500000" in _title(spec) and "head_dim 32" in _title(spec)


def test_only_sin_cos_and_rotary_depend_on_the_offset_alone() -> None:
    encs = encodings(TINY_CONFIGS["gqa"], positions=32, dims=16)
    spread = {name: offset_deviation(sim) for name, (_, sim) in encs.items()}
    assert spread["sin + cos"] < 1e-4 and spread["rotary"] < 1e-4
    assert spread["binary"] > 0.5 and spread["sin only"] > 0.5


def test_relative_errors_are_rounding_only() -> None:
    args = TINY_CONFIGS["mha"]
    errors = relative_errors(args, [(3, 10), (60, 2)])
    assert max(errors) < 1e-5


def test_one_head_picked_mean_and_spread_show_its_group() -> None:
    """With one head picked, "mean" and "spread" draw that head's group, labelled so."""
    trace = traced(TINY_CONFIGS["gqa"])  # 4 heads, 2 per group
    view = trace.attention[0]
    lower = np.tril(np.ones(view.probs.shape[1:], dtype=bool))
    for mode, expected in (("mean", view.group_mean[1]), ("spread", view.group_spread[1])):
        fig = F.attention_by_group(trace, 0, head=3, mode=mode)
        assert f"{mode} of heads 2, 3 (head 3's group)" in fig.layout.annotations[0].text
        z = np.asarray(fig.data[0].z, dtype=float)
        np.testing.assert_allclose(z[lower], expected.numpy()[lower], rtol=1e-6)


def test_chosen_token_outside_the_bars_is_named() -> None:
    step = _step(0)
    outside = Step(99, "x", step.position, 0.01, step.top, 0.1, 0.05)
    title = _title(F.token_probabilities(outside, "Max"))
    assert "Max (id 99, outside the top" in title

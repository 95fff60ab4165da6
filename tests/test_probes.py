"""llama/probes: recomputed attention matches the fast path, groups, RoPE and KV records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llama.config import ModelArgs
from llama.model import AttentionCapture, Transformer
from llama.probes import Probe, Trace, token_label
from llama.probes.capture import attention_probs
from llama.probes.views import counterfactual_kv_heads, group_reduce, kv_bytes
from llama.rope import apply_rope, rope_angles
from tests.conftest import TINY_CONFIGS, shared_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(args: ModelArgs) -> Transformer:
    model = Transformer(args).eval()
    model.setup_caches(1)
    return model


@torch.no_grad()
def drive(model: Transformer, probe: Probe, prompt: list[int], n_new: int) -> list[int]:
    """What generate() does for the probe: begin, prefill, greedy decode with on_step, end.

    Positions 0 .. len(prompt) + n_new - 2 pass through the model."""
    probe.begin(model, prompt)
    try:
        pos = len(prompt)
        logits = model(torch.tensor([prompt]), torch.arange(pos), last_only=True)
        out = []
        for i in range(n_new):
            token = int(logits[0, -1].argmax())
            out.append(token)
            probe.on_step(SimpleNamespace(token_id=token, position=pos, text=str(token)))
            if i < n_new - 1:  # the last token is sampled, never fed back
                logits = model(torch.tensor([[token]]), torch.tensor([pos]))
                pos += 1
        return out
    finally:
        probe.end(model)


def _captures(model: Transformer, *forwards: tuple[list[int], list[int]]) -> list[AttentionCapture]:
    caps: list[AttentionCapture] = []
    model.set_observer(caps.append)
    with torch.no_grad():
        for tokens, positions in forwards:
            model(torch.tensor([tokens]), torch.tensor(positions))
    model.set_observer(None)
    return caps


def _expand_values(cap: AttentionCapture) -> torch.Tensor:
    n_rep = cap.q.shape[1] // cap.values.shape[1]
    return cap.values[0].float().repeat_interleave(n_rep, dim=0)  # (H, T_kv, D)


def test_probs_times_values_reproduce_fast_path_output(tiny_args: ModelArgs) -> None:
    # prefill at 0 (is_causal), a second chunk into a non-empty cache (explicit mask), a decode
    caps = _captures(
        _model(tiny_args), ([3, 1, 4, 1, 5], [0, 1, 2, 3, 4]), ([9, 2, 6], [5, 6, 7]), ([5], [8])
    )
    assert len(caps) == 3 * tiny_args.n_layers
    for cap in caps:
        probs = attention_probs(cap)  # (H, T, T_kv)
        torch.testing.assert_close(
            probs @ _expand_values(cap), cap.out[0].float(), rtol=1e-5, atol=1e-5
        )


def test_attention_probs_rows_sum_to_one_and_respect_causality(tiny_args: ModelArgs) -> None:
    caps = _captures(_model(tiny_args), ([3, 1, 4, 1, 5, 9], list(range(6))), ([2, 6], [6, 7]))
    for cap in caps:
        probs = attention_probs(cap)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
        for t, pos in enumerate(cap.input_pos.tolist()):
            assert torch.all(probs[:, t, pos + 1 :] == 0)
            assert torch.all(probs[:, t, : pos + 1] > 0)
    last_rows = attention_probs(caps[-1], rows=1)
    torch.testing.assert_close(last_rows, attention_probs(caps[-1])[:, -1:])


def test_probe_rows_sum_to_one_and_equal_recomputation(tiny_args: ModelArgs) -> None:
    model = _model(tiny_args)
    probe = Probe(tiny_args, layers={0, 1}, window=64)
    drive(model, probe, [1, 7, 3, 8, 2], n_new=6)
    trace = probe.snapshot()
    assert trace.positions == list(range(10)) and trace.n_steps == 6
    for layer in (0, 1):
        view = trace.attention[layer]
        assert view.query_positions == list(range(10))
        assert view.probs.shape == (tiny_args.n_heads, 10, 10)
        torch.testing.assert_close(view.probs.sum(-1), torch.ones(tiny_args.n_heads, 10))
        assert view.outside.abs().max() < 1e-6
    # The same numbers as a plain causal forward over the whole sequence.
    tokens = [1, 7, 3, 8, 2, *[int(t) for t in trace.tokens[5:]]]
    caps: list[AttentionCapture] = []
    model.set_observer(caps.append, {1})
    with torch.no_grad():
        model(torch.tensor([tokens]))
    model.set_observer(None)
    torch.testing.assert_close(
        trace.attention[1].probs, attention_probs(caps[0]), rtol=1e-4, atol=1e-5
    )


def test_window_bounds_memory_and_keeps_mass_accounted(tiny_args: ModelArgs) -> None:
    probe = Probe(tiny_args, layers={1}, window=4)
    drive(_model(tiny_args), probe, [1, 2, 3, 4, 5, 6, 7], n_new=8)
    assert len(probe._rows[1]) <= 4
    assert all(row.shape[-1] <= 4 for row in probe._rows[1].values())
    assert len(probe._rope.keys) <= 4 and len(probe._tokens) <= 5  # + the unfed last token
    trace = probe.snapshot()
    view = trace.attention[1]
    assert view.probs.shape == (tiny_args.n_heads, 4, 4)
    assert view.key_positions == trace.positions == [10, 11, 12, 13]
    assert "?" not in trace.tokens
    torch.testing.assert_close(view.probs.sum(-1) + view.outside, torch.ones(tiny_args.n_heads, 4))
    assert view.outside.min() > 0  # older keys still get some probability


def test_group_reduction_shapes_and_values(tiny_args: ModelArgs) -> None:
    probe = Probe(tiny_args, layers={0})
    drive(_model(tiny_args), probe, [4, 5, 6], n_new=3)
    view = probe.snapshot().attention[0]
    shape = (tiny_args.kv_heads, len(view.query_positions), len(view.key_positions))
    assert view.group_mean.shape == shape and view.group_spread.shape == shape
    n_rep = tiny_args.n_rep
    for g in range(tiny_args.kv_heads):
        heads = view.probs[g * n_rep : (g + 1) * n_rep]
        torch.testing.assert_close(view.group_mean[g], heads.mean(0))
        torch.testing.assert_close(view.group_spread[g], heads.amax(0) - heads.amin(0))
    if tiny_args.attention_kind == "MHA":
        assert torch.all(view.group_spread == 0)
    else:
        assert view.group_spread.max() > 0


def test_group_reduce_rejects_wrong_group_count() -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        group_reduce(torch.rand(4, 2, 2), 3)


def test_rope_trace_norms_rotation_and_scores(tiny_args: ModelArgs) -> None:
    probe = Probe(tiny_args, layers={1}, rope_head=tiny_args.n_heads - 1)
    model = _model(tiny_args)
    drive(model, probe, [1, 2, 3, 4], n_new=5)
    rope = probe.snapshot().rope
    assert rope is not None
    assert (rope.layer, rope.head, rope.kv_head) == (
        1,
        tiny_args.n_heads - 1,
        tiny_args.kv_heads - 1,
    )
    assert rope.position == 7 and rope.key_positions == list(range(8))
    torch.testing.assert_close(rope.q_raw.norm(), rope.q_rot.norm())
    torch.testing.assert_close(rope.k_raw.norm(), rope.k_rot.norm())
    assert not torch.allclose(rope.q_raw, rope.q_rot)
    angles = rope_angles(torch.tensor([7]), tiny_args.head_dim, tiny_args.rope_theta)
    torch.testing.assert_close(rope.angles, angles[0])
    rotated = apply_rope(rope.q_raw.view(1, 1, 1, -1), torch.cos(angles), torch.sin(angles))
    torch.testing.assert_close(rotated.flatten(), rope.q_rot)
    cached_k = model.caches()[1].k[0, rope.kv_head, 7]
    torch.testing.assert_close(rope.k_rot, cached_k)
    torch.testing.assert_close(rope.q_path[-1], rope.q_rot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rope.q_path.norm(dim=-1), rope.q_raw.norm().expand(8))
    scale = tiny_args.head_dim**0.5
    torch.testing.assert_close(rope.scores_rope[-1], rope.q_rot @ rope.k_rot / scale)
    torch.testing.assert_close(rope.scores_plain[-1], rope.q_raw @ rope.k_raw / scale)


def test_kv_bytes_follow_the_formula(tiny_args: ModelArgs) -> None:
    model = _model(tiny_args)
    probe = Probe(tiny_args, layers={0})
    drive(model, probe, [1, 2, 3], n_new=4)
    kv = probe.snapshot().kv
    assert kv is not None
    assert kv.steps == [0, 1, 2, 3] and kv.positions == [3, 4, 5, 6]
    itemsize = model.caches()[0].k.element_size()
    a = tiny_args
    for positions, per_layer in zip(kv.positions, kv.bytes_per_layer, strict=True):
        expected = 2 * a.n_layers * a.kv_heads * a.head_dim * positions * itemsize
        assert sum(per_layer) == expected == kv_bytes(a, positions, itemsize)
        assert len(per_layer) == a.n_layers
    assert kv.capacity_positions == a.max_seq_len
    assert sum(kv.capacity_bytes_per_layer) == kv_bytes(a, a.max_seq_len, itemsize)
    assert kv.bytes_for(a.kv_heads, 6) == sum(kv.bytes_per_layer[-1])


def test_rope_layer_can_differ_from_the_attention_layers() -> None:
    args = TINY_CONFIGS["gqa"]
    probe = Probe(args, layers={0}, rope_layer=1, rope_head=2)
    assert probe.observed_layers == {0, 1}
    model = _model(args)
    drive(model, probe, [1, 2, 3], n_new=2)
    rope = probe.snapshot().rope
    assert rope is not None and (rope.layer, rope.head, rope.kv_head) == (1, 2, 1)
    torch.testing.assert_close(rope.k_rot, model.caches()[1].k[0, 1, rope.position])


def test_kv_only_probe_still_counts_positions() -> None:
    args = TINY_CONFIGS["gqa"]
    probe = Probe(args, attention=False, rope=False)
    model = _model(args)
    drive(model, probe, [1, 2], n_new=3)
    trace = probe.snapshot()
    assert trace.attention == {} and trace.rope is None
    assert trace.kv is not None and trace.kv.positions == [2, 3, 4]


def test_counterfactuals_name_the_honest_alternatives() -> None:
    mha = ModelArgs(dim=4096, n_layers=32, n_heads=32)
    assert counterfactual_kv_heads(mha) == {
        "MHA (H_kv=32)": 32,
        "GQA (H_kv=4)": 4,
        "MQA (H_kv=1)": 1,
    }
    gqa = TINY_CONFIGS["gqa"]
    assert counterfactual_kv_heads(gqa) == {"MHA (H_kv=4)": 4, "GQA (H_kv=2)": 2, "MQA (H_kv=1)": 1}
    two = ModelArgs(dim=64, n_layers=1, n_heads=2)
    assert counterfactual_kv_heads(two) == {"MHA (H_kv=2)": 2, "MQA (H_kv=1)": 1}


def test_observers_attach_to_traced_layers_and_detach_at_end() -> None:
    args = TINY_CONFIGS["mha"].replace(n_layers=3)
    model = _model(args)
    probe = Probe(args, layers={2}, rope=False)
    probe.begin(model, [1])
    assert [blk.attention.observer is not None for blk in model.layers] == [False, False, True]
    probe.end(model)
    assert all(blk.attention.observer is None for blk in model.layers)
    everything = Probe(args, layers=None)
    everything.begin(model, [1])
    assert all(blk.attention.observer is not None for blk in model.layers)
    everything.end(model)


def test_begin_resets_and_labels_use_token_pieces() -> None:
    args = TINY_CONFIGS["gqa"]
    model = _model(args)
    probe = Probe(args, token_pieces=lambda i: f" t{i}\n")
    drive(model, probe, [5, 6, 7], n_new=2)
    drive(model, probe, [8, 9], n_new=1)
    trace = probe.snapshot()
    assert isinstance(trace, Trace) and trace.n_steps == 1
    assert trace.positions == [0, 1] and trace.tokens == ["␣t8↵", "␣t9↵"]
    assert trace.label(1) == "␣t9↵" and trace.label(40) == "?"
    assert token_label("") == "∅"


def test_snapshot_before_anything_is_empty_but_valid() -> None:
    trace = Probe(TINY_CONFIGS["mqa"]).snapshot()
    assert trace.positions == [] and trace.attention == {} and trace.rope is None
    assert trace.kv is None and trace.step is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layers": {2}}, "layers"),
        ({"layers": set()}, "layers"),
        ({"rope_head": 4}, "rope_head"),
        ({"rope_head": -1}, "rope_head"),
        ({"window": 0}, "window"),
        ({"rope_layer": 2}, "rope_layer"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Probe(TINY_CONFIGS["gqa"], **kwargs)


def test_end_to_end_through_generate_on_stories260k() -> None:
    from llama.checkpoints import load
    from llama.generate import generate
    from llama.sampling import SamplingParams
    from llama.tokenizer import load_tokenizer
    from ui import figures

    loaded = load(shared_file("stories260K", "stories260K.bin"), device="cpu", progress=False)
    model, tok = loaded.model, load_tokenizer(shared_file("stories260K", "tok512.model"))
    prompt = tok.encode("Once upon a time, there was a cat")
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    plain = [s.token_id for s in generate(model, tok, prompt, params)]
    probe = Probe(model.args, layers={0, 4}, rope_head=5, window=32, token_pieces=tok.piece)
    steps = list(generate(model, tok, prompt, params, probe=probe))
    assert [s.token_id for s in steps] == plain  # watching does not change the output
    assert all(blk.attention.observer is None for blk in model.layers)
    trace = probe.snapshot()
    assert trace.step is steps[-1] and trace.n_steps == len(steps)
    last = steps[-1].position - 1  # the last token is sampled, never fed back
    ids = prompt + plain
    assert trace.positions == list(range(last - 31, last + 1))
    assert trace.tokens == [token_label(tok.piece(ids[p])) for p in trace.positions]
    for view in trace.attention.values():
        torch.testing.assert_close(
            view.probs.sum(-1) + view.outside, torch.ones(model.args.n_heads, 32)
        )
    assert trace.rope is not None and trace.rope.position == last
    assert trace.kv is not None and trace.kv.positions == [s.position for s in steps]
    figs = [
        figures.attention_by_group(trace, 4),
        figures.rope_rotation(trace, 5),
        figures.kv_cache_growth(trace),
        figures.token_probabilities(trace.step),
    ]
    assert all(fig.data for fig in figs)


def test_trace_survives_the_next_generation() -> None:
    args = TINY_CONFIGS["gqa"]
    model = _model(args)
    probe = Probe(args, layers={0, 1})
    drive(model, probe, [1, 2, 3, 4], n_new=4)
    trace = probe.snapshot()
    kept = [t.clone() for t in (trace.rope.k_rot, trace.rope.q_rot, trace.attention[0].probs)]
    drive(model, Probe(args, layers={0, 1}), [9, 8, 7, 6, 5, 4, 3], n_new=6)  # overwrites caches
    for before, now in zip(
        kept, (trace.rope.k_rot, trace.rope.q_rot, trace.attention[0].probs), strict=True
    ):
        assert torch.equal(before, now)


def test_snapshot_from_another_thread_while_recording() -> None:
    import threading

    args = TINY_CONFIGS["mqa"]
    probe = Probe(args, layers={0, 1}, window=8)
    errors: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                probe.snapshot()
            except BaseException as exc:
                errors.append(exc)
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        drive(_model(args), probe, list(range(1, 20)), n_new=30)
    finally:
        done.set()
        watcher.join()
    assert errors == []


def test_snapshots_between_steps_do_not_change_the_rows() -> None:
    # Decode rows are computed in batches (at snapshot, at end, or every `window` steps).
    args = TINY_CONFIGS["gqa"]
    model = _model(args)
    quiet = Probe(args, layers={0, 1}, window=6)
    drive(model, quiet, [1, 2, 3], n_new=12)

    class Watched(Probe):
        def on_step(self, step) -> None:
            super().on_step(step)
            self.snapshot()

    watched = Watched(args, layers={0, 1}, window=6)
    drive(model, watched, [1, 2, 3], n_new=12)
    a, b = quiet.snapshot(), watched.snapshot()
    assert a.positions == b.positions == list(range(8, 14))
    for layer in (0, 1):
        torch.testing.assert_close(a.attention[layer].probs, b.attention[layer].probs)
    torch.testing.assert_close(a.rope.scores_rope, b.rope.scores_rope)
    assert all(not p.positions for p in watched._pending.values())

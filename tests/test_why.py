"""The Why views' computation: logit lens, attention sinks, attribution, ablation and replays."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llama.assets import SHIPPED_MODEL_DIR
from llama.checkpoints import load
from llama.config import ModelArgs
from llama.generate import generate
from llama.model import Transformer
from llama.probes import Probe
from llama.probes.ablation import (
    Ablation,
    AblationError,
    compare_samplers,
    first_divergence,
    group_heads,
    replay,
    reply_ids,
)
from llama.probes.attribution import attention_value_rows, grad_x_input, value_norms
from llama.probes.capture import attention_probs
from llama.probes.lens import decided_at, lens_column, lens_layers
from llama.probes.sinks import sink_heads, sink_mass
from llama.probes.why import ProbeGroup, WhyProbe
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer, open_tokenizer
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [1, 5, 9, 13, 2, 7]


def _model(args: ModelArgs) -> Transformer:
    model = Transformer(args).eval()
    for p in model.parameters():  # random norms too, so a wrong norm would show
        p.data.normal_(0.0, 0.3)
    model.prepare_for_decode()
    model.setup_caches(1)
    return model


@pytest.fixture(scope="module")
def shipped() -> tuple[Transformer, Tokenizer]:
    if not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED_MODEL_DIR} holds no model.safetensors")
    loaded = load(SHIPPED_MODEL_DIR, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.tokenizer_path is not None
    loaded.model.setup_caches(1)
    return loaded.model, open_tokenizer(loaded)


@torch.inference_mode()
def _greedy(model: Transformer, probe, n_new: int = 5) -> tuple[list[int], list[torch.Tensor]]:
    """begin, prefill, greedy decode with on_step, end; -> (reply ids, logits per step)."""
    probe.begin(model, PROMPT)
    ids, out = list(PROMPT), []
    try:
        logits = model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)[0, -1]
        for _ in range(n_new):
            out.append(logits)
            ids.append(int(logits.argmax()))
            probe.on_step(SimpleNamespace(token_id=ids[-1], position=len(ids) - 1))
            pos = torch.tensor([len(ids) - 1])
            logits = model(torch.tensor([[ids[-1]]]), pos, last_only=True)[0, -1]
    finally:
        probe.end(model)
    return ids[len(PROMPT) :], out


# Logit lens --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_lens_of_the_last_layer_is_the_models_logits(kind: str) -> None:
    model = _model(TINY_CONFIGS[kind])
    for rows, last_only in ((1, True), (3, False)):
        lens: list = []
        model.set_residual_observer(lambda cap: lens.append(cap), lens_rows=rows)
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), last_only)
        model.set_residual_observer(None)
        last = [c for c in lens if c.layer == model.args.n_layers - 1]
        assert len(lens) == model.args.n_layers and len(last) == 1
        assert last[0].lens.shape == (1, rows, model.args.vocab_size)
        # the same ops on the same rows: bit-identical; on more rows the product's blocking
        # may round differently
        exact = 0.0 if last_only else 1e-5
        torch.testing.assert_close(last[0].lens, logits[:, -rows:], rtol=0, atol=exact)
    assert model._fast_layers() is not None  # the observer kept the fused route


def test_lens_probe_columns_and_chosen_token(shipped) -> None:
    model, _ = shipped
    probe = WhyProbe(model.args, sinks=False, attribution=False, window=8)
    reply, step_logits = _greedy(model, probe)
    trace = probe.snapshot()
    positions = [c.position for c in trace.lens]
    assert positions == list(range(len(PROMPT) + len(reply) - 9, len(PROMPT) + len(reply) - 1))
    for i, token in enumerate(reply[-3:]):
        col = trace.lens[-3 + i]
        assert col.token == token
        # the model's own (greedy) choice: top of the last layer, rank 0, its probability
        assert int(col.top_ids[-1]) == token and int(col.token_rank[-1]) == 0
        p = torch.softmax(step_logits[-3 + i], -1)[token]
        assert float(col.token_prob[-1]) == pytest.approx(float(p), rel=1e-5)
    assert model.residual_observer is None and model.layers[0].attention.observer is None


def test_lens_column_rank_and_decided_layer() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 5.0, 1.0]])  # (L=3, V=3)
    col = lens_column(4, logits, token=1, layers=(0, 4, 9))
    assert col.top_ids.tolist() == [1, 0, 1] and col.token_rank.tolist() == [0, 1, 0]
    assert decided_at(col) == 9  # a layer number, not a row index
    assert decided_at(lens_column(4, logits, token=2, layers=(0, 4, 9))) is None


def test_lens_layers_every_kth_and_the_last() -> None:
    assert lens_layers(30, 8) == (0, 8, 16, 24, 29) and lens_layers(6, 1) == tuple(range(6))
    assert lens_layers(30) == (0, 8, 16, 24, 29) and lens_layers(6) == (0, 2, 4, 5)
    assert lens_layers(2) == (0, 1) and lens_layers(1) == (0,)
    with pytest.raises(ValueError, match="lens every: expected a positive"):
        lens_layers(6, 0)


def test_lens_on_chosen_layers_only_equals_those_rows_of_the_full_lens(shipped) -> None:
    """The lens's cost is one output projection per lensed layer (the last layer's is the
    decode step's own); the chosen layers' columns are those of the lens over every layer."""
    model, _ = shipped
    n = model.args.n_layers
    calls: list[int] = []
    # every output projection follows the final norm (Transformer._logits)
    hook = model.norm.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    try:
        nothing = SimpleNamespace(
            begin=lambda m, p: None, on_step=lambda s: None, end=lambda m: None
        )
        plain_ids, plain = _greedy(model, nothing)
        without = len(calls)
        full = WhyProbe(model.args, sinks=False, attribution=False, window=8, lens_every=1)
        _greedy(model, full)
        calls.clear()
        some = WhyProbe(model.args, sinks=False, attribution=False, window=8, lens_every=3)
        ids, logits = _greedy(model, some)
    finally:
        hook.remove()
    chosen = lens_layers(n, 3)
    assert len(chosen) < n and without == 6  # prefill + 5 decode steps, one product each
    # prefill: each lensed layer, then the forward's last row; decode: the lensed layers only
    assert len(calls) == len(chosen) + 1 + 5 * len(chosen)
    assert ids == plain_ids and all(torch.equal(a, b) for a, b in zip(logits, plain))
    for a, b in zip(full.snapshot().lens, some.snapshot().lens, strict=True):
        assert b.layers == chosen and a.layers == tuple(range(n))
        rows = list(chosen)
        assert torch.equal(a.top_ids[rows], b.top_ids)
        assert torch.equal(a.token_rank[rows], b.token_rank)
        torch.testing.assert_close(a.token_prob[rows], b.token_prob, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lens_layers: expected layers in 0..\d+, found"):
        model.set_residual_observer(lambda cap: None, 1, [n])


# Attention sinks and attribution -------------------------------------------------------------
def test_sink_mass_equals_the_attention_rows_it_is_computed_from() -> None:
    model = _model(TINY_CONFIGS["gqa"])
    captures: list = []
    group = ProbeGroup(
        WhyProbe(model.args, lens=False, window=32), _Recorder(captures, model.args.n_layers)
    )
    _greedy(model, group)
    trace = group.probes[0].snapshot()
    assert trace.sinks is not None and len(trace.sinks.positions) == 6  # prefill + 5 decodes
    for cap in captures:
        pos = int(cap.input_pos[-1])
        rows = attention_probs(cap, rows=1)[:, 0]  # (H, T_kv)
        s = trace.sinks.positions.index(pos)
        assert torch.equal(trace.sinks.mass[s, cap.layer], rows[:, 0])
        assert torch.allclose(sink_mass(rows[:, None], 2)[:, 0], rows[:, :2].sum(-1))
        norms = value_norms(cap.values[0])
        want = attention_value_rows(rows, norms)
        torch.testing.assert_close(trace.attribution[pos][cap.layer], want)
        assert float(want.sum()) == pytest.approx(1.0, abs=1e-5)


class _Recorder:
    """A probe that keeps every attention capture (as a ProbeGroup member)."""

    def __init__(self, out: list, n_layers: int) -> None:
        self.out, self.observed_layers = out, frozenset(range(n_layers))

    def begin(self, model, prompt_ids) -> None:
        pass

    def observe(self, cap) -> None:
        self.out.append(cap)

    def on_step(self, step) -> None:
        pass

    def end(self, model) -> None:
        model.set_observer(None)


def test_sink_heads_flag_by_threshold() -> None:
    mass = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    assert sink_heads(mass, 0.5) == [[0, 2], []]


def test_group_runs_why_probe_beside_probe(shipped) -> None:
    model, _ = shipped
    alone = Probe(model.args, layers={0, 2}, window=16)
    _greedy(model, alone)
    probe, why = Probe(model.args, layers={0, 2}, window=16), WhyProbe(model.args, window=16)
    _greedy(model, ProbeGroup(probe, why))
    for layer in (0, 2):
        torch.testing.assert_close(
            probe.snapshot().attention[layer].probs, alone.snapshot().attention[layer].probs
        )
    assert len(why.snapshot().lens) == len(PROMPT) + 5 - 1 and why.snapshot().sinks is not None


def test_gradient_x_input_matches_a_finite_difference() -> None:
    model = _model(TINY_CONFIGS["mqa"]).double()
    ids = [*PROMPT, 3]
    scores = grad_x_input(model, ids, len(ids) - 1)
    assert scores.shape == (len(ids) - 1,)
    # sum_t g_t . e_t is the directional derivative along the embeddings: scale them all.
    emb = model.tok_embeddings.weight.data
    base = emb.clone()

    def log_p(scale: float) -> float:
        emb.copy_(base * scale)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), last_only=True)[0, -1]
        return float(torch.log_softmax(logits.double(), -1)[ids[-1]])

    eps = 1e-3  # the model rounds through fp32 (norms, logits): smaller steps are noise
    slope = (log_p(1 + eps) - log_p(1 - eps)) / (2 * eps)
    emb.copy_(base)
    assert float(scores.sum()) == pytest.approx(slope, rel=1e-4, abs=1e-7)
    assert all(p.requires_grad for p in model.parameters())


# Ablation and replays ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_ablating_a_head_changes_exactly_that_heads_output(kind: str) -> None:
    model = _model(TINY_CONFIGS[kind])
    tokens = torch.tensor([PROMPT])
    layer, head, start = 1, 2, 3

    def outs(ablation: Ablation | None) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list = []
        zero = ablation.observer() if ablation else (lambda cap: None)

        def observer(cap) -> None:
            zero(cap)
            seen.append(cap.out.clone())

        model.set_observer(observer, {0, 1})
        with torch.inference_mode():
            logits = model(tokens)
        model.set_observer(None)
        return torch.stack(seen), logits

    (before, logits), (after, changed) = outs(None), outs(Ablation(layer, (head,), start))
    assert torch.equal(before[0], after[0])  # layer 0 runs first: untouched
    others = [h for h in range(model.args.n_heads) if h != head]
    assert torch.equal(before[1][:, others], after[1][:, others])  # bit-identical
    assert torch.equal(before[1][:, head, :start], after[1][:, head, :start])  # before start
    assert after[1][:, head, start:].abs().max() == 0 < before[1][:, head, start:].abs().max()
    assert torch.equal(logits[:, :start], changed[:, :start])
    assert not torch.equal(logits[:, start:], changed[:, start:])


def test_replay_with_nothing_ablated_reproduces_the_reply(shipped) -> None:
    model, tok = shipped
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_new_tokens=24)
    original = reply_ids(list(generate(model, tok, PROMPT, params)))
    same = replay(model, tok, PROMPT, params, original, None)
    assert same.replayed == original and same.diverge is None
    torch.testing.assert_close(same.p_changed, same.p_original, rtol=0, atol=0)
    # ablate a GQA group from the 5th reply token on: unchanged up to there
    heads = tuple(group_heads(model.args, 1))
    start = len(PROMPT) + 4 - 1  # the query that predicts reply token 4
    changed = replay(model, tok, PROMPT, params, original, Ablation(3, heads, start))
    assert changed.replayed[:4] == original[:4]
    torch.testing.assert_close(changed.p_changed[:4], changed.p_original[:4])
    assert not torch.equal(changed.p_changed[4:], changed.p_original[4:])
    assert model.layers[3].attention.observer is None


def test_compare_samplers_marks_differing_tokens(shipped) -> None:
    model, tok = shipped
    a = SamplingParams(temperature=0.0, seed=5, max_new_tokens=16)
    b = SamplingParams(temperature=1.5, seed=99, max_new_tokens=16)
    cmp = compare_samplers(model, tok, PROMPT, a, b)
    ids_a, ids_b = reply_ids(cmp.steps_a), reply_ids(cmp.steps_b)
    assert cmp.differ == [i for i in range(len(ids_a)) if ids_a[i] != ids_b[i]]
    assert cmp.diverge == (cmp.differ[0] if cmp.differ else None)
    again = compare_samplers(model, tok, PROMPT, a, a.replace(seed=1))
    assert again.differ == [] and again.diverge is None


def test_bad_ablations_are_named() -> None:
    args = TINY_CONFIGS["gqa"]
    with pytest.raises(AblationError, match=r"layer: expected 0..1, found 5"):
        Ablation(5, (0,)).check(args)
    with pytest.raises(AblationError, match=r"heads: expected query heads in 0..3, found \[4\]"):
        Ablation(0, (4,)).check(args)
    with pytest.raises(AblationError, match=r"group: expected 0..1, found 2"):
        group_heads(args, 2)
    with pytest.raises(AblationError, match="seed"):
        replay(None, None, PROMPT, SamplingParams(), [], None)  # type: ignore[arg-type]
    assert first_divergence([1, 2, 3], [1, 2]) == 2 and first_divergence([1], [1]) is None


def test_why_views_and_ablation_on_an_8bit_model() -> None:
    """bitsandbytes Linear8bitLt blocks: the module route; every view still runs."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from llama.quant import quantise_model

    model = quantise_model(_model(TINY_CONFIGS["gqa"]))
    model.setup_caches(1)
    assert type(model.layers[0].attention.wo).__name__ == "Linear8bitLt"
    lens: list = []
    model.set_residual_observer(lambda cap: lens.append(cap.lens), lens_rows=1)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), last_only=True)
    model.set_residual_observer(None)
    torch.testing.assert_close(lens[-1], logits, rtol=0, atol=0)
    why = WhyProbe(model.args, window=16)
    _greedy(model, why)
    trace = why.snapshot()
    assert trace.sinks is not None and len(trace.lens) == len(PROMPT) + 5 - 1
    captured: list = []
    ablation = Ablation(1, (0, 1), start=2)
    zero = ablation.observer()
    model.set_observer(lambda cap: (zero(cap), captured.append(cap.out.clone())), {1})
    with torch.inference_mode():
        model(torch.tensor([PROMPT]))
    model.set_observer(None)
    assert captured[0][:, :2, 2:].abs().max() == 0 < captured[0][:, 2:].abs().max()

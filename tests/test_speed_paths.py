"""The fast paths compute what the plain ones do: fused projections, the fast block route,
the static (compile target) decode step, the compiled step itself, and thread settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama import functional
from llama.cache import CacheOverflowError
from llama.checkpoints import load, save
from llama.checkpoints.writers import random_transformer
from llama.config import ModelArgs
from llama.functional import rotate
from llama.model import COLUMN_MAJOR_MAX_DIM, AttentionCapture, Transformer
from llama.rope import apply_rope, rope_tables
from llama.runtime_opts import (
    apply_threads,
    compile_decode,
    configure_threads,
    physical_cores,
    recommended_threads,
    uncompile_decode,
)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def pair(args: ModelArgs) -> tuple[Transformer, Transformer]:
    """(plain, fused) models with the same random weights."""
    plain = random_transformer(args)
    fused = Transformer(args)
    fused.load_state_dict(plain.state_dict(), strict=True)
    assert fused.fuse_projections() == 2 * args.n_layers
    return plain, fused


def cached_logits(
    model: Transformer, tokens: torch.Tensor, chunks: tuple[int, ...], cache_batch: int = 0
) -> torch.Tensor:
    model.setup_caches(cache_batch or tokens.shape[0])
    parts, start = [], 0
    with torch.no_grad():
        for n in chunks:
            parts.append(model(tokens[:, start : start + n], torch.arange(start, start + n)))
            start += n
    return torch.cat(parts, dim=1)


# Fusion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(12,), (5, 1, 1, 3, 2), (1,) * 8])
def test_fused_equals_plain(tiny_args: ModelArgs, chunks: tuple[int, ...]) -> None:
    plain, fused = pair(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        reference = plain(tokens)
        torch.testing.assert_close(fused(tokens), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(fused, tokens, chunks), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(plain, tokens, chunks), reference, atol=ATOL, rtol=0)


def test_fused_state_dict_keeps_meta_names(tiny_args: ModelArgs, tmp_path: Path) -> None:
    plain, fused = pair(tiny_args)
    mine, theirs = fused.state_dict(), plain.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert not any("wqkv" in k or "w13" in k for k in mine)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    from safetensors.torch import load_file, save_file

    save_file(mine, tmp_path / "m.safetensors")  # no shared storage between the pieces
    again = Transformer(tiny_args)
    again.fuse_projections()  # fuse first, then load Meta names (the load pre-hook)
    again.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True, assign=True)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), plain(tokens), atol=ATOL, rtol=0)


def test_fusion_hands_each_replaced_weight_to_release(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    names = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
    old = {
        (i, n): model.get_parameter(f"layers.{i}.{n}.weight").data_ptr()
        for i in range(tiny_args.n_layers)
        for n in names
    }
    released: list[int] = []
    model.fuse_projections(release=lambda t: released.append(t.data_ptr()))
    assert sorted(released) == sorted(old.values())


def test_fusing_twice_changes_nothing(tiny_args: ModelArgs) -> None:
    _, fused = pair(tiny_args)
    before = {k: v.clone() for k, v in fused.named_parameters()}
    fused.fuse_projections()
    after = dict(fused.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_load_refuses_bad_meta_tensors(tiny_args: ModelArgs) -> None:
    plain, fused = pair(tiny_args)
    state = plain.state_dict()
    wrong = dict(state)
    wrong["layers.1.attention.wk.weight"] = torch.zeros(3, tiny_args.dim)
    with pytest.raises(RuntimeError, match=r"layers\.1\.attention\.wk\.weight: expected shape"):
        fused.load_state_dict(wrong, strict=True)
    missing = {k: v for k, v in state.items() if k != "layers.0.feed_forward.w3.weight"}
    with pytest.raises(RuntimeError, match=r"layers\.0\.feed_forward\.w3\.weight: missing"):
        fused.load_state_dict(missing, strict=True)


class NotPlainLinear(nn.Linear):
    """Stands in for a swapped module (bitsandbytes' Linear8bitLt is an nn.Linear subclass)."""


def test_fusion_skips_modules_that_are_not_plain_linear(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 6))
    with torch.no_grad():
        reference = model(tokens)
    old = model.layers[0].attention.wq
    swapped = NotPlainLinear(old.in_features, old.out_features, bias=False)
    swapped.weight = old.weight
    model.layers[0].attention.wq = swapped
    assert model.fuse_projections() == 2 * tiny_args.n_layers - 1
    assert model.layers[0].attention.wqkv is None and model.layers[0].feed_forward.w13 is not None
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference, atol=ATOL, rtol=0)


def test_eight_bit_model_is_left_unfused_and_runs(tiny_args: ModelArgs) -> None:
    pytest.importorskip("bitsandbytes")
    from llama.quant import quantise_model

    model = quantise_model(random_transformer(tiny_args))
    assert model.fuse_projections() == 0
    model.setup_caches(1)
    with torch.no_grad():
        out = model(torch.randint(0, tiny_args.vocab_size, (1, 4)), torch.arange(4))
    assert out.shape == (1, 4, tiny_args.vocab_size) and torch.isfinite(out).all()


def test_fused_training_gradients_match(tiny_args: ModelArgs) -> None:
    plain, fused = pair(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 10))
    losses = []
    for model in (plain, fused):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    a, f = plain.layers[1], fused.layers[1]
    grads = [a.attention.wq.weight.grad, a.attention.wk.weight.grad, a.attention.wv.weight.grad]
    torch.testing.assert_close(f.attention.wqkv.weight.grad, torch.cat(grads), atol=1e-5, rtol=1e-4)
    grads = [a.feed_forward.w1.weight.grad, a.feed_forward.w3.weight.grad]
    torch.testing.assert_close(
        f.feed_forward.w13.weight.grad, torch.cat(grads), atol=1e-5, rtol=1e-4
    )


def test_fast_route_follows_replaced_weights_and_caches(tiny_args: ModelArgs) -> None:
    """The fast route caches each block's tensors: every way of swapping them must show."""
    plain, fused = pair(tiny_args)
    other = random_transformer(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 6))
    with torch.no_grad():
        fused(tokens)  # the cached tensor list now exists
        fused.load_state_dict(other.state_dict(), strict=True, assign=True)  # new objects
        torch.testing.assert_close(fused(tokens), other(tokens), atol=ATOL, rtol=0)
        fused.load_state_dict(plain.state_dict(), strict=True)  # in place
        torch.testing.assert_close(fused(tokens), plain(tokens), atol=ATOL, rtol=0)
        fused.layers[0].attention.wo.weight = nn.Parameter(other.layers[0].attention.wo.weight)
        plain.layers[0].attention.wo.weight = nn.Parameter(other.layers[0].attention.wo.weight)
        fused.invalidate_routes()  # a weight swapped by hand: the documented duty
        torch.testing.assert_close(fused(tokens), plain(tokens), atol=ATOL, rtol=0)
        got = cached_logits(fused, tokens, (4, 1, 1), cache_batch=3)  # batch 2 in a 3-cache
        torch.testing.assert_close(got, plain(tokens), atol=ATOL, rtol=0)
        fused.double()
        torch.testing.assert_close(fused(tokens), plain.double()(tokens), atol=ATOL, rtol=0)


def route(model: Transformer) -> str:
    """Which route the next forward takes: "fast", "module" or "observed"."""
    fast = model._fast_layers()
    return "observed" if model._observed else ("fast" if fast is not None else "module")


def test_each_structure_change_switches_the_route(tiny_args: ModelArgs, tmp_path: Path) -> None:
    """No process-wide hooks: every method that changes what the fast route reads re-chooses
    it (load, fuse, quantise, .to(), set_observer, setup_caches, tying)."""
    plain = random_transformer(tiny_args)
    assert route(plain) == "module"  # unfused
    plain.fuse_projections()
    assert route(plain) == "fast"
    plain.set_observer(lambda c: None, layers={0})
    assert route(plain) == "observed"
    plain.set_observer(None)
    assert route(plain) == "fast"
    plain.setup_caches(1)
    assert plain._fast_layers()[0].cache is plain.layers[0].attention.cache is not None
    plain.double()
    assert plain._fast_layers()[0].wqkv.dtype == torch.float64
    assert plain._fast[0].cache.kv.dtype == torch.float64  # caches moved with the model
    other = random_transformer(tiny_args, seed=5).double()
    plain.load_state_dict(other.state_dict(), assign=True)
    assert plain._fast_layers()[0].wqkv is plain.layers[0].attention.wqkv.weight
    plain.output.weight = plain.tok_embeddings.weight
    plain.invalidate_routes()
    assert plain.output_tied and route(plain) == "fast"
    loaded = load(save(random_transformer(tiny_args), tmp_path / "m"), device="cpu",
                  progress=False).model
    assert route(loaded) == "fast"
    bnb = pytest.importorskip("bitsandbytes")
    from llama.quant import quantise_model

    quantise_model(loaded)
    assert isinstance(loaded.layers[0].attention.wo, bnb.nn.Linear8bitLt)
    assert route(loaded) == "module"


def test_tying_at_load_rechooses_the_route(tiny_args: ModelArgs, tmp_path: Path) -> None:
    tied = random_transformer(tiny_args)
    tied.output.weight = tied.tok_embeddings.weight
    model = load(save(tied, tmp_path / "t"), device="cpu", progress=False).model
    assert model.output_tied and route(model) == "fast"
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tied(tokens), atol=ATOL, rtol=0)


# What load() prepares: fused projections, the column-major output ------------------------
def test_load_prepares_for_decode_and_keeps_the_checkpoint(
    tiny_args: ModelArgs, tmp_path: Path
) -> None:
    model = random_transformer(tiny_args, seed=3)
    path = save(model, tmp_path / "m")
    prepared = load(path, device="cpu", progress=False).model
    as_on_disk = load(path, device="cpu", progress=False, fuse=False).model
    assert all(b.attention.wqkv is not None and b.feed_forward.w13 is not None
               for b in prepared.layers)
    assert as_on_disk.layers[0].attention.wqkv is None
    w = prepared.output.weight  # same values, whatever the layout (next test)
    assert w.shape == (tiny_args.vocab_size, tiny_args.dim)
    assert torch.equal(w, as_on_disk.output.weight)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(prepared(tokens), as_on_disk(tokens), atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(prepared, tokens, (5, 1, 1, 1, 1)),
                               as_on_disk(tokens), atol=ATOL, rtol=0)
    # The checkpoint round-trips bit for bit from the prepared model.
    again = load(save(prepared, tmp_path / "again"), device="cpu", progress=False, fuse=False)
    mine, theirs = again.model.state_dict(), as_on_disk.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert prepared.prepare_for_decode() == 2 * tiny_args.n_layers  # fused already: no-op
    assert prepared.output.weight is w


def test_column_major_output_only_where_it_is_measured_faster(
    tiny_args: ModelArgs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(functional, "_ONEDNN_FP32", False)  # MKL's products: column-major
    small = random_transformer(tiny_args)
    small.prepare_for_decode()
    w = small.output.weight
    assert w.stride() == (1, w.shape[0])
    tied = random_transformer(tiny_args)
    tied.output.weight = tied.tok_embeddings.weight
    assert tied.prepare_for_decode() == 2 * tiny_args.n_layers  # fused, output left tied
    assert tied.output.weight is tied.tok_embeddings.weight
    wide = random_transformer(tiny_args.replace(dim=COLUMN_MAJOR_MAX_DIM + 64, n_heads=4,
                                                n_kv_heads=2))
    wide.prepare_for_decode()
    assert wide.output.weight.is_contiguous()
    half = random_transformer(tiny_args).to(torch.bfloat16)
    half.prepare_for_decode()
    assert half.output.weight.is_contiguous()
    monkeypatch.setattr(functional, "_ONEDNN_FP32", True)  # oneDNN's products read rows
    rows = random_transformer(tiny_args)
    rows.prepare_for_decode()
    assert rows.output.weight.is_contiguous()


@pytest.mark.skipif(not functional.onednn_fp32(), reason="this torch build has no oneDNN")
def test_fp32_products_through_onednn_match_f_linear_and_keep_autograd(
    tiny_args: ModelArgs, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, w = torch.randn(2, 5, 64), torch.randn(96, 64, requires_grad=True)
    with torch.inference_mode():
        torch.testing.assert_close(functional.linear(x, w), F.linear(x, w), atol=1e-4, rtol=0)
    x.requires_grad_(True)  # with autograd on, F.linear: the gradient flows
    functional.linear(x, w).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, w.detach().sum(0).expand_as(x))
    model = random_transformer(tiny_args)
    model.prepare_for_decode()
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 7))
    with torch.inference_mode():
        fast = model(tokens)
    monkeypatch.setattr(functional, "_ONEDNN_FP32", False)
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), fast, atol=ATOL, rtol=0)


# The observer sees the same thing on every route -----------------------------------------
def test_observer_captures_agree_between_plain_and_fused(tiny_args: ModelArgs) -> None:
    plain, fused = pair(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 7))
    seen: dict[str, list[AttentionCapture]] = {"plain": [], "fused": []}
    for name, model in (("plain", plain), ("fused", fused)):
        model.set_observer(seen[name].append, layers={1})
        model.setup_caches(1)
        with torch.no_grad():
            model(tokens[:, :5], torch.arange(5))
            model(tokens[:, 5:6], torch.tensor([5]))
    assert [c.layer for c in seen["fused"]] == [1, 1]
    for p, f in zip(seen["plain"], seen["fused"], strict=True):
        assert torch.equal(p.input_pos, f.input_pos)
        for field in ("q_raw", "k_raw", "q", "keys", "values", "out"):
            a, b = getattr(p, field), getattr(f, field)
            assert a.shape == b.shape, field
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=field)
    # and the observed (module) route gives the logits of the unobserved fast route
    fused.set_observer(None)
    watched = random_transformer(tiny_args)
    watched.load_state_dict(plain.state_dict())
    watched.fuse_projections()
    watched.set_observer(lambda c: None)
    with torch.no_grad():
        torch.testing.assert_close(watched(tokens), fused(tokens), atol=ATOL, rtol=0)


# RoPE, caches, the static step ------------------------------------------------------------
def test_rotate_forms_match_apply_rope() -> None:
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([0, 3, 7, 100, 511])
    cos, sin = rope_tables(512, 8)
    expected = apply_rope(x, cos[positions], sin[positions])
    complex_rot = torch.complex(cos, sin)[positions].unsqueeze(1)
    real_rot = torch.stack((cos, sin), -1)[positions].unsqueeze(1)
    torch.testing.assert_close(rotate(x, complex_rot), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rotate(x, real_rot), expected, atol=1e-6, rtol=1e-5)


def test_rope_tables_stay_fp32_and_real_after_meta_build(tiny_args: ModelArgs) -> None:
    with torch.device("meta"):
        model = Transformer(tiny_args)
    model.to_empty(device="cpu").to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.rope_cos.device.type == "cpu"
    cos, _ = rope_tables(tiny_args.max_seq_len, tiny_args.head_dim)
    torch.testing.assert_close(model.rope_cos, cos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_equals_eager_decode(tiny_args: ModelArgs, dtype: torch.dtype) -> None:
    """What compile_decode compiles (full-cache mask, real RoPE) run eagerly."""
    _, model = pair(tiny_args)
    model.to(dtype)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 9))
    model.setup_caches(1, max_seq_len=16)
    with torch.no_grad():
        model(tokens[:, :6], torch.arange(6))
        eager = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(6, 9)]
        model(tokens[:, :6], torch.arange(6))
        static = [model.static_decode(tokens[:, i : i + 1], torch.tensor([i])) for i in range(6, 9)]
    tol = ATOL if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.cat(static, 1), torch.cat(eager, 1), atol=tol, rtol=0)


def test_short_cache_and_bad_positions_are_refused(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    with pytest.raises(ValueError, match="max_seq_len: expected 1"):
        model.setup_caches(1, max_seq_len=tiny_args.max_seq_len + 1)
    model.setup_caches(1, max_seq_len=8)
    assert model.caches()[0].nbytes() == 2 * tiny_args.kv_heads * 8 * tiny_args.head_dim * 4
    with torch.no_grad(), pytest.raises(CacheOverflowError, match="capacity of 8"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([8]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_pos: expected shape \(2,\)"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))


def test_kv_views_share_one_buffer(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    model.setup_caches(2)
    cache = model.caches()[0]
    k = torch.randn(2, tiny_args.kv_heads, 1, tiny_args.head_dim)
    v = torch.randn_like(k)
    cache.update(torch.tensor([3]), k, v)
    torch.testing.assert_close(cache.k[:, :, 3:4], k)
    torch.testing.assert_close(cache.kv[:, tiny_args.kv_heads :, 3:4], v)


# Compiled decode ---------------------------------------------------------------------------
def check_compiled_decode(backend: str) -> None:
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16
    )
    eager, compiled = pair(args)
    eager.setup_caches(1)
    torch._dynamo.reset()
    compile_decode(compiled, backend=backend)
    tokens = torch.randint(0, args.vocab_size, (1, 10))
    with torch.no_grad():
        want = [eager(tokens[:, :6], torch.arange(6))]
        got = [compiled(tokens[:, :6], torch.arange(6))]
        for i in range(6, 10):
            want.append(eager(tokens[:, i : i + 1], torch.tensor([i])))
            got.append(compiled(tokens[:, i : i + 1], torch.tensor([i])))
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=ATOL, rtol=0)
    uncompile_decode(compiled)
    assert compiled.compiled_decode is None


def test_compiled_decode_graph_equals_eager() -> None:
    """The traced graph (dynamo + functionalised cache writes), run without codegen: quick."""
    check_compiled_decode("aot_eager")


@pytest.mark.slow
def test_compiled_decode_inductor_equals_eager() -> None:
    """inductor generates and builds C++: a minute or more on 2 busy cores."""
    check_compiled_decode("inductor")


# Threads ---------------------------------------------------------------------------------
def test_physical_cores_counts_hyperthreads_once(tmp_path: Path) -> None:
    blocks = [f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n" for i in range(4)]
    info = tmp_path / "cpuinfo"
    info.write_text("\n".join(blocks))
    logical = len(__import__("os").sched_getaffinity(0))
    assert physical_cores(info) == max(1, logical * 2 // 4)
    assert physical_cores(tmp_path / "absent") == logical


def test_thread_recommendation_and_setting() -> None:
    assert recommended_threads(2_000_000, "cpu") == min(2, physical_cores())
    assert recommended_threads(1_100_000_000, "cpu") == physical_cores()
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads: expected a positive integer"):
        configure_threads(0)
    before = torch.get_num_threads()
    try:  # what app.py and the CLI call: a --threads flag wins, else the recommendation
        small = min(2, physical_cores())
        assert apply_threads(None, 2_000_000, "cpu") == small == torch.get_num_threads()
        assert apply_threads(None, 24_000_000, "cpu") == physical_cores()
        assert apply_threads(1, 24_000_000, "cpu") == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

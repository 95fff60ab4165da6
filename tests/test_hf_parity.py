"""Parity with transformers' LlamaForCausalLM, the reference implementation.

A random tiny LlamaForCausalLM is written with transformers' own save_pretrained (so the
files are in the genuine HF layout, wq/wk permuted for rotate_half), loaded through our HF
loader, and both models run the same prefill and 32 cached decode steps. Non-default RoPE
bases (1e5 SmolLM2, 5e5 Llama-3, 1e6 CodeLlama) and rms_norm_eps 1e-6 are checked in the
config.json form the installed transformers writes (5.x: `rope_parameters`) and in the older
top-level `rope_theta` form (issue 19: the new form used to load silently with theta 1e4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama.checkpoints import load

transformers = pytest.importorskip("transformers")

TOL = 1e-4
REL_TOL = 1e-5  # max |diff| / max |logit| (~3e-7 measured); random tiny logits are ~0.5
THETAS = (1e5, 5e5, 1e6)
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def reference_model(
    n_kv_heads: int, tied: bool, theta: float = 10000.0, eps: float = 1e-5
) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        vocab_size=97,
        max_position_embeddings=80,
        rms_norm_eps=eps,
        rope_theta=theta,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too: a norm mapped to the wrong place must show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def save_reference(model: torch.nn.Module, directory: Path, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def run_both(
    ref: torch.nn.Module, ours: torch.nn.Module, prompt: torch.Tensor, steps: int
) -> tuple[list[float], float]:
    """(max |logit diff| for the prefill and each of `steps` cached decode steps,
    max |logit| of the reference over them all: the scale the diffs are judged against)."""
    ours.setup_caches(prompt.shape[0])
    with torch.no_grad():
        out = ref(prompt, use_cache=True)
        mine = ours(prompt, torch.arange(prompt.shape[1]))
        diffs = [(out.logits - mine).abs().max().item()]
        scale = out.logits.abs().max().item()
        past, pos = out.past_key_values, prompt.shape[1]
        token = out.logits[:, -1:].argmax(-1)  # (B, 1) greedy from the reference
        for _ in range(steps):
            out = ref(token, past_key_values=past, use_cache=True)
            mine = ours(token, torch.tensor([pos]))
            diffs.append((out.logits - mine).abs().max().item())
            scale = max(scale, out.logits.abs().max().item())
            past, pos = out.past_key_values, pos + 1
            token = out.logits[:, -1:].argmax(-1)
    return diffs, scale


@pytest.mark.parametrize("kind", sorted(KV_HEADS))
def test_prefill_and_32_decode_steps_match_transformers(kind: str, tmp_path: Path) -> None:
    ref = reference_model(KV_HEADS[kind], tied=False)
    loaded = load(save_reference(ref, tmp_path), device="cpu", dtype=torch.float32, progress=False)
    assert loaded.format == "hf"
    assert loaded.model.args.attention_kind == kind.upper()
    prompt = torch.randint(0, 97, (2, 11))
    diffs, _ = run_both(ref, loaded.model, prompt, steps=32)
    print(f"{kind}: max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert len(diffs) == 33
    assert max(diffs) <= TOL


def test_sharded_and_tied_checkpoints_match(tmp_path: Path) -> None:
    """save_pretrained's sharded layout (index json) and tie_word_embeddings=True."""
    ref = reference_model(2, tied=True)
    directory = save_reference(ref, tmp_path, shard="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    loaded = load(directory, device="cpu", dtype=torch.float32, progress=False)
    model = loaded.model
    assert model.output.weight is model.tok_embeddings.weight
    diffs, _ = run_both(ref, model, torch.randint(0, 97, (1, 7)), steps=4)
    assert max(diffs) <= TOL


def test_unpermuting_k_with_n_heads_would_be_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The known port bug (k un-permuted with n_heads on a GQA model) breaks parity well
    beyond the tolerance: the parity test above would see it."""
    from llama.checkpoints import hf

    ref = reference_model(2, tied=False)
    directory = save_reference(ref, tmp_path)
    right = hf.unpermute
    asked: list[int] = []

    def buggy(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        asked.append(n_heads)
        return right(w, 4)  # always n_heads, the bug

    monkeypatch.setattr(hf, "unpermute", buggy)
    model = load(directory, device="cpu", dtype=torch.float32, progress=False).model
    assert sorted(set(asked)) == [2, 4]  # our loader asks for k with n_kv_heads
    diffs, _ = run_both(ref, model, torch.randint(0, 97, (1, 7)), steps=0)
    assert diffs[0] > 10 * TOL


def to_legacy_form(directory: Path) -> dict:
    """Rewrite config.json as transformers < 5 wrote it: top-level rope_theta, rope_scaling."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope["rope_theta"], "rope_scaling": None}
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("kind", sorted(KV_HEADS))
def test_non_default_rope_theta_and_eps_match_transformers(
    kind: str, theta: float, tmp_path: Path
) -> None:
    ref = reference_model(KV_HEADS[kind], tied=False, theta=theta, eps=1e-6)
    directory = save_reference(ref, tmp_path, shard="40KB")
    config = json.loads((directory / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == theta  # transformers 5's form
    assert "rope_theta" not in config
    model = load(directory, device="cpu", dtype=torch.float32, progress=False).model
    assert (model.args.rope_theta, model.args.norm_eps) == (theta, 1e-6)
    diffs, scale = run_both(ref, model, torch.randint(0, 97, (2, 11)), steps=32)
    print(f"{kind} theta {theta:g}: max |diff| {max(diffs):.2e}, max |logit| {scale:.2f}")
    assert max(diffs) <= TOL and max(diffs) <= REL_TOL * scale


@pytest.mark.parametrize("theta", THETAS)
def test_legacy_rope_theta_form_matches_transformers(theta: float, tmp_path: Path) -> None:
    ref = reference_model(2, tied=True, theta=theta, eps=1e-6)
    directory = save_reference(ref, tmp_path)
    to_legacy_form(directory)
    model = load(directory, device="cpu", dtype=torch.float32, progress=False).model
    assert model.args.rope_theta == theta
    diffs, scale = run_both(ref, model, torch.randint(0, 97, (1, 9)), steps=16)
    assert max(diffs) <= TOL and max(diffs) <= REL_TOL * scale


def test_the_default_theta_would_be_caught(tmp_path: Path) -> None:
    """Loading a 5e5 checkpoint with theta 1e4 (issue 19's bug: rope_parameters not read)
    breaks the relative tolerance well beyond the margin the tests above leave."""
    ref = reference_model(1, tied=False, theta=5e5, eps=1e-6)
    directory = save_reference(ref, tmp_path)
    config = to_legacy_form(directory)
    config.pop("rope_theta")
    (directory / "config.json").write_text(json.dumps(config))
    model = load(directory, device="cpu", dtype=torch.float32, progress=False).model
    assert model.args.rope_theta == 10000.0
    diffs, scale = run_both(ref, model, torch.randint(0, 97, (2, 11)), steps=32)
    print(f"theta 1e4 for a 5e5 checkpoint: max |diff| {max(diffs):.2e}, max |logit| {scale:.2f}")
    assert max(diffs) > 10 * REL_TOL * scale

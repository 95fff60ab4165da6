"""Parity with transformers' LlamaForCausalLM, the reference implementation.

A random tiny LlamaForCausalLM is written with transformers' own save_pretrained (so the
files are in the genuine HF layout, wq/wk permuted for rotate_half), loaded through our HF
loader, and both models run the same prefill and 32 cached decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama.checkpoints import load

transformers = pytest.importorskip("transformers")

TOL = 1e-4
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def reference_model(n_kv_heads: int, tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, vocab_size=97, max_position_embeddings=80,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
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


def run_both(ref: torch.nn.Module, ours: torch.nn.Module, prompt: torch.Tensor,
             steps: int) -> list[float]:
    """Max |logit diff| for the prefill and each of `steps` cached decode steps."""
    ours.setup_caches(prompt.shape[0])
    with torch.no_grad():
        out = ref(prompt, use_cache=True)
        mine = ours(prompt, torch.arange(prompt.shape[1]))
        diffs = [(out.logits - mine).abs().max().item()]
        past, pos = out.past_key_values, prompt.shape[1]
        token = out.logits[:, -1:].argmax(-1)  # (B, 1) greedy from the reference
        for _ in range(steps):
            out = ref(token, past_key_values=past, use_cache=True)
            mine = ours(token, torch.tensor([pos]))
            diffs.append((out.logits - mine).abs().max().item())
            past, pos = out.past_key_values, pos + 1
            token = out.logits[:, -1:].argmax(-1)
    return diffs


@pytest.mark.parametrize("kind", sorted(KV_HEADS))
def test_prefill_and_32_decode_steps_match_transformers(kind: str, tmp_path: Path) -> None:
    ref = reference_model(KV_HEADS[kind], tied=False)
    loaded = load(save_reference(ref, tmp_path), device="cpu", dtype=torch.float32,
                  progress=False)
    assert loaded.format == "hf"
    assert loaded.model.args.attention_kind == kind.upper()
    prompt = torch.randint(0, 97, (2, 11))
    diffs = run_both(ref, loaded.model, prompt, steps=32)
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
    diffs = run_both(ref, model, torch.randint(0, 97, (1, 7)), steps=4)
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
    diffs = run_both(ref, model, torch.randint(0, 97, (1, 7)), steps=0)
    assert diffs[0] > 10 * TOL

"""Model-level properties: cached decoding equals the full forward, the RoPE forms agree and
encode relative position, Meta's FFN sizes, and ModelArgs' refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama.cache import CacheOverflowError
from llama.checkpoints.writers import random_transformer
from llama.config import PRESETS, ConfigError, ModelArgs
from llama.hf_config import load_hf_config
from llama.rope import apply_rope, apply_rope_complex, apply_rope_matrix, rope_tables

ATOL = 1e-5


# Cached decoding -------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(1,) * 12, (5, 1, 1, 3, 2), (4, 4, 4), (12,)])
def test_cached_decode_equals_full_forward(tiny_args: ModelArgs, chunks: tuple) -> None:
    """Prefill + decode steps + multi-token chunks written into a non-empty cache."""
    model = random_transformer(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, sum(chunks)))
    model.setup_caches(2)
    with torch.no_grad():
        full = model(tokens)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(tokens[:, start:start + n], torch.arange(start, start + n)))
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


def test_last_only_returns_the_last_position(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])


def test_cache_overflow_is_refused(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    model.setup_caches(1)
    last = tiny_args.max_seq_len - 1
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([last]))
        with pytest.raises(CacheOverflowError):
            model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([last, last + 1]))


def test_cache_holds_only_kv_heads(tiny_args: ModelArgs) -> None:
    model = random_transformer(tiny_args)
    model.setup_caches(3)
    for cache in model.caches():
        assert cache.k.shape == (3, tiny_args.kv_heads, tiny_args.max_seq_len,
                                 tiny_args.head_dim)


# RoPE --------------------------------------------------------------------------------------
def test_three_rope_forms_agree() -> None:
    x = torch.randn(2, 9, 3, 16)  # (B, T, H, D)
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 511, 1000, 4095])
    cos, sin = rope_tables(4096, 16)
    fast = apply_rope(x, cos[positions], sin[positions])
    torch.testing.assert_close(apply_rope_complex(x, positions), fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope_matrix(x, positions), fast, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast[:, 1:], x[:, 1:], atol=1e-3)  # it does rotate
    torch.testing.assert_close(fast.norm(dim=-1), x.norm(dim=-1))  # and only rotates


def test_rope_rotates_interleaved_pairs() -> None:
    """Meta's layout: pair i is (x[2i], x[2i+1]), rotated by m * theta_i."""
    x = torch.zeros(1, 1, 1, 8)
    x[..., 2] = 1.0  # pair 1, first component
    m = torch.tensor([3])
    out = apply_rope_complex(x, m)
    theta_1 = 10000.0 ** (-2 / 8)
    expected = torch.zeros(8)
    expected[2], expected[3] = torch.cos(torch.tensor(3 * theta_1)), torch.sin(
        torch.tensor(3 * theta_1))
    torch.testing.assert_close(out.flatten(), expected)


def test_score_depends_only_on_relative_position() -> None:
    """q_m . k_n is a function of m - n (RoFormer's relative-position property)."""
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m: int, n: int) -> float:
        qm = apply_rope_complex(q, torch.tensor([m]))
        kn = apply_rope_complex(k, torch.tensor([n]))
        return float((qm * kn).sum())

    for offset in (0, 1, 7, 100):
        values = [score(n + offset, n) for n in (0, 3, 50, 1000)]
        assert max(values) - min(values) < 1e-3, values
    assert abs(score(10, 0) - score(0, 10)) > 1e-3  # and on its sign


# ModelArgs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, hidden", [("llama2-7b", 11008), ("llama2-13b", 13824),
                                            ("llama2-70b", 28672)])
def test_meta_ffn_rule_gives_published_sizes(preset: str, hidden: int) -> None:
    assert PRESETS[preset].ffn_hidden_dim == hidden


def test_attention_kinds_and_sizes() -> None:
    assert PRESETS["llama2-7b"].attention_kind == "MHA"
    assert PRESETS["llama2-70b"].attention_kind == "GQA" and PRESETS["llama2-70b"].n_rep == 8
    assert ModelArgs(dim=64, n_heads=4, n_kv_heads=1).attention_kind == "MQA"
    assert 6.7e9 < PRESETS["llama2-7b"].n_params() < 6.8e9


@pytest.mark.parametrize("fields, field", [
    (dict(dim=65, n_heads=4), "dim"),
    (dict(dim=12, n_heads=4), "head_dim"),  # head size 3 is odd: RoPE needs pairs
    (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=64, n_heads=4, n_kv_heads=0), "n_kv_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(max_seq_len=2.5), "max_seq_len"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_impossible_shapes_raise_config_error(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelArgs(**fields)


def test_params_json_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    with pytest.raises(ConfigError, match="file not found"):
        ModelArgs.from_params_json(path)
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "vocab_size": -1}))
    with pytest.raises(ConfigError, match=f"{path}.*n_heads"):
        ModelArgs.from_params_json(path)
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    with pytest.raises(ConfigError, match="vocab_size is -1"):
        ModelArgs.from_params_json(path)
    assert ModelArgs.from_params_json(path, vocab_size=97).vocab_size == 97


def test_hf_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    good = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 97, "intermediate_size": 96}
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}))
    with pytest.raises(ConfigError, match="vocab_size"):
        load_hf_config(path)
    path.write_text(json.dumps(good | {"rope_scaling": {"rope_type": "linear", "factor": 2}}))
    with pytest.raises(ConfigError, match="rope_scaling"):
        load_hf_config(path)
    path.write_text(json.dumps(good | {"num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_hf_config(path)
    path.write_text(json.dumps(good))
    assert load_hf_config(path)[0].ffn_hidden_dim == 96

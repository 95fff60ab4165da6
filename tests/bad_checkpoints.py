"""Checkpoint directories that are broken in one named way each (issue 15, items 5 and 6).

`CASES` maps a case name to (builder, what the error must name). The loader tests load each
in-process; the CLI and app.py tests run each as a subprocess and expect one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from llama.checkpoints import save
from llama.checkpoints.writers import meta_state, random_transformer, write_hf
from tests.conftest import TINY_CONFIGS

ARGS = TINY_CONFIGS["gqa"]


def native_with_header(root: Path, header: object) -> Path:
    """A native checkpoint whose safetensors JSON header is replaced by `header`."""
    save(random_transformer(ARGS), root)
    path = root / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return root


def native_with_params(root: Path, **fields: object) -> Path:
    """A native checkpoint with params.json fields changed (None removes the field)."""
    save(random_transformer(ARGS), root)
    params = json.loads((root / "params.json").read_text()) | fields
    params = {k: v for k, v in params.items() if v is not None}
    (root / "params.json").write_text(json.dumps(params))  # NaN written as JSON's NaN
    return root


def hf_with_config(root: Path, **fields: object) -> Path:
    """An HF checkpoint (our writer's config.json) with fields changed or added."""
    write_hf(meta_state(random_transformer(ARGS)), ARGS, root)
    config = json.loads((root / "config.json").read_text()) | fields
    (root / "config.json").write_text(json.dumps(config))
    return root


def native_with_bad_value(root: Path, name: str, value: float) -> Path:
    model = random_transformer(ARGS)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[3] = value
    return save(model, root)


def hf_with_bad_value(root: Path, name: str, value: float) -> Path:
    state = meta_state(random_transformer(ARGS))
    state[name].view(-1)[5] = value
    return write_hf(state, ARGS, root)


_ENTRY = {"dtype": "F32", "shape": [97, 64]}
Builder = Callable[[Path], Path]
CASES: dict[str, tuple[Builder, tuple[str, ...]]] = {
    # issue 15.6: tracebacks before
    "safetensors_without_data_offsets": (
        lambda r: native_with_header(r, {"tok_embeddings.weight": _ENTRY}),
        ("model.safetensors", "'tok_embeddings.weight'", "data_offsets"),
    ),
    "safetensors_list_header": (
        lambda r: native_with_header(r, [1, 2]),
        ("model.safetensors", "header", "found a JSON list"),
    ),
    "safetensors_int_entry": (
        lambda r: native_with_header(r, {"tok_embeddings.weight": 5}),
        ("model.safetensors", "'tok_embeddings.weight'", "data_offsets", "found 5"),
    ),
    "safetensors_string_offsets": (
        lambda r: native_with_header(
            r, {"tok_embeddings.weight": _ENTRY | {"data_offsets": ["0", "24832"]}}
        ),
        ("model.safetensors", "'tok_embeddings.weight'", "data_offsets", '"0"'),
    ),
    "rope_scaling_string": (
        lambda r: hf_with_config(r, rope_scaling="linear"),
        ("config.json", "rope_scaling", "expected an object", "'linear'"),
    ),
    "hidden_dim_negative": (
        lambda r: native_with_params(r, hidden_dim=-5),
        ("params.json", "hidden_dim", "positive integer", "-5"),
    ),
    "hidden_dim_string": (
        lambda r: native_with_params(r, hidden_dim="96"),
        ("params.json", "hidden_dim", "positive integer", "'96'"),
    ),
    "hidden_dim_float": (
        lambda r: native_with_params(r, hidden_dim=96.0),
        ("params.json", "hidden_dim", "positive integer", "96.0"),
    ),
    "ffn_dim_multiplier_negative": (
        lambda r: native_with_params(r, hidden_dim=None, ffn_dim_multiplier=-1.0),
        ("params.json", "ffn_dim_multiplier", "positive", "-1.0"),
    ),
    # issue 15.5: loaded silently before
    "norm_eps_nan": (
        lambda r: native_with_params(r, norm_eps=float("nan")),
        ("params.json", "norm_eps", "finite positive", "nan"),
    ),
    "weight_nan": (
        lambda r: native_with_bad_value(r, "layers.1.feed_forward.w2.weight", float("nan")),
        ("model.safetensors", "'layers.1.feed_forward.w2.weight'", "1 NaN"),
    ),
    "weight_inf_hf": (
        lambda r: hf_with_bad_value(r, "norm.weight", float("-inf")),
        ("model.safetensors", "'norm.weight'", "1 infinite"),
    ),
    "gemma_config": (
        lambda r: hf_with_config(r, model_type="gemma", architectures=["GemmaForCausalLM"]),
        ("config.json", "model_type", "'gemma'"),
    ),
    "mistral_sliding_window": (
        lambda r: hf_with_config(r, sliding_window=4096),
        ("config.json", "sliding_window", "4096"),
    ),
    "hidden_act_gelu": (
        lambda r: hf_with_config(r, hidden_act="gelu"),
        ("config.json", "hidden_act", "'silu'", "'gelu'"),
    ),
    "attention_bias_true": (
        lambda r: hf_with_config(r, attention_bias=True),
        ("config.json", "attention_bias", "found true"),
    ),
}

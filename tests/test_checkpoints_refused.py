"""Config fields that change the maths are honoured or refused by name, and corrupt weights
never load (issues 19 and 15 items 5-6). Every refusal names the file and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llama.checkpoints import CheckpointError, load
from llama.checkpoints.common import check_finite
from tests.bad_checkpoints import CASES, hf_with_config, native_with_params
from tests.test_checkpoints_bad import refused


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_refused_naming_file_and_field(case: str, tmp_path: Path) -> None:
    build, patterns = CASES[case]
    path = build(tmp_path)
    refused(path, *patterns)


# config.json: one test per refused field value -------------------------------------------
REFUSED_HF = {
    "rope_parameters_llama3": (
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
        ("rope_parameters", "'llama3'", "not implemented"),
    ),
    "rope_parameters_linear": (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
        ("rope_parameters", "'linear'", "not implemented"),
    ),
    "rope_parameters_dynamic": (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        ("rope_parameters", "'dynamic'"),
    ),
    "rope_parameters_yarn": ({"rope_parameters": {"rope_type": "yarn"}}, ("'yarn'",)),
    "rope_scaling_legacy_linear": (
        {"rope_scaling": {"type": "linear", "factor": 4.0}},
        ("rope_scaling", "'linear'", "not implemented"),
    ),
    "rope_scaling_llama3": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 32.0}, "rope_theta": 5e5},
        ("rope_scaling", "'llama3'"),
    ),
    "rope_parameters_not_object": ({"rope_parameters": 500000.0}, ("rope_parameters", "object")),
    "rope_default_with_factor": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}},
        ("rope_parameters", "factor"),
    ),
    "rope_scaling_linear_beside_default_parameters": (
        {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "linear"}},
        ("rope_scaling", "'linear'"),
    ),
    "rope_theta_nan": ({"rope_theta": float("nan")}, ("rope_theta", "finite", "nan")),
    "rope_theta_string": ({"rope_theta": "1e4"}, ("rope_theta", "'1e4'")),
    "rope_theta_negative_in_parameters": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
        ("rope_theta", "-1.0"),
    ),
    "partial_rotary_factor": ({"partial_rotary_factor": 0.5}, ("partial_rotary_factor", "0.5")),
    "partial_rotary_factor_in_rope_parameters": (
        {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
        ("partial_rotary_factor", "0.25"),
    ),
    "head_dim_not_hidden_over_heads": ({"head_dim": 32}, ("head_dim", "32", "64")),
    "mlp_bias": ({"mlp_bias": True}, ("mlp_bias", "found true")),
    "hidden_act_gelu_tanh": (
        {"hidden_act": "gelu_pytorch_tanh"},
        ("hidden_act", "'gelu_pytorch_tanh'"),
    ),
    "tie_word_embeddings_string": ({"tie_word_embeddings": "yes"}, ("tie_word_embeddings",)),
    "model_type_mistral": ({"model_type": "mistral"}, ("model_type", "'mistral'")),
    "architectures_mistral": (
        {"architectures": ["MistralForCausalLM"]},
        ("architectures", "MistralForCausalLM"),
    ),
    "use_sliding_window": (
        {"use_sliding_window": True, "sliding_window": 4096},
        ("use_sliding_window", "found true"),
    ),
    "rope_interleaved": ({"rope_interleaved": True}, ("rope_interleaved", "found true")),
    "unknown_softcapping": (
        {"attn_logit_softcapping": 50.0},
        ("'attn_logit_softcapping'", "50.0", "refused"),
    ),
    "quantization_config": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        ("quantization_config", '{"quant_method": "gptq"'),
    ),
    "auto_map": ({"auto_map": {"AutoModelForCausalLM": "m.M"}}, ("auto_map", "own modelling")),
    "rms_norm_eps_zero": ({"rms_norm_eps": 0}, ("rms_norm_eps", "positive")),
    "hidden_size_string": ({"hidden_size": "64"}, ("hidden_size",)),
}


@pytest.mark.parametrize("case", sorted(REFUSED_HF))
def test_config_json_field_refused(case: str, tmp_path: Path) -> None:
    fields, patterns = REFUSED_HF[case]
    refused(hf_with_config(tmp_path, **fields), str(tmp_path / "config.json"), *patterns)


def test_rope_theta_read_from_both_forms_the_newer_winning(tmp_path: Path) -> None:
    cases = [
        ({"rope_theta": 1e6, "rope_scaling": None}, 1e6),  # transformers 4
        ({"rope_theta": 1e5, "rope_scaling": {"rope_type": "default"}}, 1e5),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, 5e5),  # 5
        ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, 5e5),
    ]
    for i, (fields, theta) in enumerate(cases):
        root = hf_with_config(tmp_path / str(i), **fields)
        if "rope_theta" not in fields:
            config = json.loads((root / "config.json").read_text())
            del config["rope_theta"]
            (root / "config.json").write_text(json.dumps(config))
        args = load(root, device="cpu", progress=False).model.args
        assert args.rope_theta == theta, fields


def test_harmless_fields_load(tmp_path: Path) -> None:
    """Bookkeeping and LLaMA's own values of the fixed fields are accepted."""
    fields = {
        "pretraining_tp": 1,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "partial_rotary_factor": 1.0,
        "head_dim": 16,
        "bos_token_id": 1,
        "torch_dtype": "float32",
        "transformers_version": "4.45.0",
        "use_cache": True,
        "attention_dropout": 0.0,
        "architectures": ["LlamaForCausalLM"],
    }
    assert load(hf_with_config(tmp_path, **fields), device="cpu", progress=False).model


# params.json -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "patterns"),
    [
        ({"use_scaled_rope": True}, ("use_scaled_rope", "found True")),
        ({"moe_args": {"num_experts": 16}}, ("'moe_args'", "refused")),
        ({"rope_theta": float("inf")}, ("rope_theta", "inf")),
        ({"norm_eps": -1e-5}, ("norm_eps", "-1e-05")),
        ({"n_kv_heads": True}, ("n_kv_heads", "True")),
        ({"hidden_dim": None, "ffn_dim_multiplier": 1e-9}, ("ffn_dim_multiplier", "width of 0")),
    ],
    ids=["use_scaled_rope", "unknown", "theta_inf", "eps_negative", "kv_bool", "ffn_zero"],
)
def test_params_json_field_refused(fields: dict, patterns: tuple, tmp_path: Path) -> None:
    refused(native_with_params(tmp_path, **fields), str(tmp_path / "params.json"), *patterns)


def test_params_json_harmless_fields_load(tmp_path: Path) -> None:
    root = native_with_params(tmp_path, use_scaled_rope=False, max_batch_size=4)
    assert load(root, device="cpu", progress=False).model.args.rope_theta == 10000.0


# Weights -----------------------------------------------------------------------------------
def test_overflow_in_a_narrower_dtype_is_named(tmp_path: Path) -> None:
    from llama.checkpoints import save
    from llama.checkpoints.writers import random_transformer
    from tests.bad_checkpoints import ARGS

    model = random_transformer(ARGS)
    with torch.no_grad():
        model.norm.weight[0] = 1e6  # finite in fp32, beyond fp16's 65504
    save(model, tmp_path)
    assert load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    refused(tmp_path, "'norm.weight'", "overflow torch.float16", "1e+06", dtype=torch.float16)


def test_a_sum_overflowing_on_finite_values_is_not_refused() -> None:
    t = torch.full((4,), 3e38)
    assert not torch.isfinite(t.sum())
    assert check_finite(t, "w", Path("f")) is t


def test_tensor_parallel_binding_refuses_nan_too() -> None:
    from llama.checkpoints.common import build_on_meta
    from llama.parallel.loading import bind
    from tests.bad_checkpoints import ARGS

    model = build_on_meta(ARGS)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    stream = [(n, torch.ones(s)) for n, s in shapes.items()]
    stream[2][1].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=re.escape(f"'{stream[2][0]}' holds 1 NaN")):
        bind(model, iter(stream), Path("ckpt"), torch.device("cpu"), torch.float32)


# Meta: rope.freqs must agree with params.json --------------------------------------------
def test_meta_rope_freqs_must_match_params_theta(tmp_path: Path) -> None:
    from llama.checkpoints.writers import meta_state, random_transformer, write_meta
    from tests.bad_checkpoints import ARGS

    args = ARGS.replace(rope_theta=1e6)  # a CodeLlama-like base
    write_meta(meta_state(random_transformer(args)), args, tmp_path)
    assert load(tmp_path, device="cpu", progress=False).model.args.rope_theta == 1e6
    params = json.loads((tmp_path / "params.json").read_text())
    del params["rope_theta"]  # so params.json says 1e4
    (tmp_path / "params.json").write_text(json.dumps(params))
    refused(tmp_path, "consolidated.00.pth", "'rope.freqs'", "rope_theta 10000", "~1e+06")
    from llama.parallel.loading import open_sliced  # the tensor-parallel loader checks too

    with pytest.raises(CheckpointError, match=r"'rope\.freqs' does not match"):
        open_sliced(tmp_path, None)


def test_llama2c_rope_tables_of_another_base_are_refused(tmp_path: Path) -> None:
    """A legacy llama2.c file stores its cos/sin tables; the header has no theta to say
    they were built with 1e6, so the tables themselves must be 1e4's."""
    from llama.checkpoints.writers import meta_state, random_transformer, write_llama2c
    from tests.bad_checkpoints import ARGS

    state = meta_state(random_transformer(ARGS))
    good = write_llama2c(state, ARGS, tmp_path / "good.bin", version=0)
    assert load(good, device="cpu", progress=False).model.args.rope_theta == 10000.0
    other = write_llama2c(state, ARGS.replace(rope_theta=1e6), tmp_path / "bad.bin", version=0)
    refused(other, str(other), "RoPE cos/sin tables", "rope_theta 10000")

"""Hugging Face config.json -> ModelArgs, field by field.

Every field a config.json may hold falls in one of four groups, so that nothing is silently
dropped:
- honoured: mapped onto a ModelArgs field (sizes, rms_norm_eps, RoPE theta, ...);
- fixed: the runtime implements one value only (LLaMA's); any other value is refused naming
  the field (`hidden_act: gelu`, `attention_bias: true`, `model_type: mistral`, ...);
- bookkeeping: token ids, training-only settings and generation defaults that do not change
  the forward pass;
- anything else is refused: an unknown field may be another architecture's option
  (`attn_logit_softcapping`, `layer_types`, ...) and ignoring it would give wrong answers
  with no word.

RoPE settings come in two forms: transformers < 5 writes a top-level `rope_theta` and a
`rope_scaling` object (null for LLaMA-2); transformers 5 writes one `rope_parameters` object
holding `rope_theta` and `rope_type`. The newer form wins over the top-level `rope_theta`;
only `rope_type` "default" is implemented, the others ("linear", "dynamic", "llama3", "yarn",
...) rescale frequencies or positions and are refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llama.config import ConfigError, ModelArgs, read_json_object

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
HONOURED = frozenset(
    {
        *REQUIRED,
        "num_key_value_heads",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "head_dim",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
    }
)
# field -> (the only values the runtime implements, what LLaMA does instead)
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "model_type": (("llama",), "only LLaMA checkpoints are supported"),
    "hidden_act": (("silu",), "LLaMA's SwiGLU gates with SiLU"),
    "attention_bias": ((False,), "LLaMA's attention projections have no bias"),
    "mlp_bias": ((False,), "LLaMA's feed-forward projections have no bias"),
    "use_sliding_window": ((False,), "LLaMA attends to every earlier position"),
    "partial_rotary_factor": ((1, 1.0), "LLaMA rotates every dimension of a head"),
    "rope_interleaved": ((False,), "HF LLaMA checkpoints rotate halves, their wq/wk permuted"),
    "auto_map": ((None, {}), "the checkpoint ships its own modelling code"),
    "quantization_config": ((None, {}), "quantised (GPTQ, AWQ, ...) weights are not loaded"),
}
BOOKKEEPING = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "pretraining_tp",
        "is_llama_config",
        "tokenizer_class",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "prefix",
        "pruned_heads",
        "chunk_size_feed_forward",
        "is_decoder",
        "is_encoder_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        # Written by tools around transformers; none reaches the forward pass.
        "_attn_implementation",
        "_attn_implementation_autoset",
        "transformers.js_config",
        "unsloth_version",
        "unsloth_fixed",
        "max_new_tokens",
    }
)
_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
DEFAULT_THETA = 10000.0


def load_hf_config(path: str | Path, **overrides: Any) -> tuple[ModelArgs, bool]:
    """Read a Hugging Face LlamaForCausalLM config.json -> (args, tie_word_embeddings)."""
    path = Path(path)
    kwargs, tied = read_hf_config(path, read_json_object(path))
    kwargs.update(overrides)
    try:
        return ModelArgs(**kwargs), tied
    except ConfigError as exc:
        raise hf_field_error(path, exc) from None


def read_hf_config(path: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """config.json's parsed object -> (ModelArgs keyword arguments, tie_word_embeddings).

    Raises ConfigError naming `path` and the field for anything the runtime cannot honour.
    """
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing required field(s) {', '.join(missing)}")
    for key in raw:
        _check_field(path, key, raw)
    _check_architectures(path, raw.get("architectures"))
    _check_head_dim(path, raw)
    tied = raw.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConfigError(f"{path}: tie_word_embeddings: expected true or false, found {tied!r}")
    kwargs = dict(
        dim=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=raw["num_attention_heads"],
        n_kv_heads=raw.get("num_key_value_heads"),
        vocab_size=raw["vocab_size"],
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta(path, raw),
        max_seq_len=raw.get("max_position_embeddings", 4096),
        hidden_dim=raw.get("intermediate_size"),
    )
    return kwargs, tied


def _check_field(path: Path, key: str, raw: dict[str, Any]) -> None:
    value = raw[key]
    if key in HONOURED or key in BOOKKEEPING:
        return
    if key == "sliding_window":
        if value is not None and raw.get("use_sliding_window", True) is not False:
            raise ConfigError(
                f"{path}: sliding_window: expected null (LLaMA attends to every earlier "
                f"position; sliding-window attention is not implemented), found {value!r}"
            )
        return
    if key not in FIXED:
        raise ConfigError(
            f"{path}: field {key!r} is not a LLaMA setting this runtime knows (found "
            f"{_short(value)}); it may change the model's maths, so the checkpoint is refused"
        )
    allowed, why = FIXED[key]
    if not any(value == a and type(value) is type(a) for a in allowed):
        expected = " or ".join(_json(a) for a in allowed)
        raise ConfigError(f"{path}: {key}: expected {expected} ({why}), found {_short(value)}")


def _check_architectures(path: Path, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list) or "LlamaForCausalLM" not in value:
        raise ConfigError(
            f'{path}: architectures: expected a list holding "LlamaForCausalLM", found '
            f"{_short(value)}"
        )


def _check_head_dim(path: Path, raw: dict[str, Any]) -> None:
    """The runtime derives head_dim as hidden_size / num_attention_heads (Meta's rule)."""
    head_dim = raw.get("head_dim")
    if head_dim is None:
        return
    dim, heads = raw["hidden_size"], raw["num_attention_heads"]
    if (
        not _is_int(head_dim)
        or not _is_int(dim)
        or not _is_int(heads)
        or heads <= 0
        or head_dim * heads != dim
    ):
        raise ConfigError(
            f"{path}: head_dim: expected hidden_size / num_attention_heads ({dim!r} / "
            f"{heads!r}; other head sizes are not implemented), found {head_dim!r}"
        )


def rope_theta(path: Path, raw: dict[str, Any]) -> float:
    """RoPE's base from either form; refuses rope types other than "default"."""
    forms = {name: raw.get(name) for name in ("rope_parameters", "rope_scaling")}
    for name, value in forms.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f'{path}: {name}: expected an object such as {{"rope_type": "default"}} '
                f"or null, found {_short(value)}"
            )
        if value is not None:
            _check_rope_object(path, name, value)
    # Both forms can only hold "default" here; a theta in the newer one wins.
    newer, legacy = forms["rope_parameters"], forms["rope_scaling"]
    theta = raw.get("rope_theta", DEFAULT_THETA)
    for settings in (legacy, newer):  # the newer form wins
        if settings and "rope_theta" in settings:
            theta = settings["rope_theta"]
    if not _is_number(theta) or not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"{path}: rope_theta: expected a finite positive number, found {theta!r}")
    return float(theta)


def _check_rope_object(path: Path, name: str, settings: dict[str, Any]) -> None:
    kind = _rope_type(settings)
    if kind != "default":
        raise ConfigError(
            f'{path}: {name}: rope_type {kind!r} is not implemented (only "default" RoPE; '
            '"linear", "dynamic", "llama3", "yarn" ... rescale the frequencies)'
        )
    unknown = sorted(set(settings) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: {name}: unexpected field(s) {', '.join(unknown)} for rope_type "
            '"default" (expected only rope_type and rope_theta)'
        )
    factor = settings.get("partial_rotary_factor", 1.0)
    if factor != 1.0 or isinstance(factor, bool):
        raise ConfigError(
            f"{path}: {name}: partial_rotary_factor: expected 1.0 (LLaMA rotates every "
            f"dimension of a head), found {factor!r}"
        )


def _rope_type(settings: dict[str, Any]) -> object:
    return settings.get("rope_type", settings.get("type", "default"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json(value: object) -> str:
    """How the value reads in the JSON file (strings quoted Python's way, as in messages)."""
    if isinstance(value, bool | None):
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict | list):
        return json.dumps(value)
    return repr(value)


def _short(value: object, limit: int = 80) -> str:
    """A JSON value for an error message, cut short (a hostile file may hold megabytes)."""
    text = _json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ModelArgs' field names -> config.json's, so errors name the field the user sees in the file.
_HF_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "hidden_dim": "intermediate_size",
    "rope_theta": "rope_theta",
    "head_dim": "head_dim",
}


def hf_field_error(path: Path, exc: ConfigError) -> ConfigError:
    """A ModelArgs complaint ("dim: expected ...") re-worded with config.json's field name."""
    field, sep, rest = str(exc).partition(":")
    if sep and field in _HF_NAMES:
        return ConfigError(f"{path}: {_HF_NAMES[field]}:{rest}")
    return ConfigError(f"{path}: {exc}")

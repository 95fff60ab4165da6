"""Write a model's weights in the other formats' layouts (Meta shards, HF, llama2.c).

Used by the cross-format tests and bench/load_memory.py, and handy for exporting. Every
writer takes a Meta-named state dict (`meta_state(model)`) so the layouts are produced by the
same code paths that `load` inverts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from llama.checkpoints.hf import permute
from llama.checkpoints.llama2c import MAGIC, V1_HEADER_BYTES, tensor_layout
from llama.checkpoints.meta import merge_axis
from llama.config import ModelArgs
from llama.model import Transformer
from llama.rope import rope_frequencies, rope_tables

_HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight",
           "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def meta_state(model: Transformer) -> dict[str, Tensor]:
    """Meta-named contiguous CPU copies of every parameter (output included even when tied;
    a fused model's state_dict splits its fused weights back into Meta's names)."""
    state = model.state_dict() | {"output.weight": model.output.weight}
    return {n: t.detach().to("cpu").contiguous().clone() for n, t in state.items()}


def write_meta(
    state: dict[str, Tensor], args: ModelArgs, directory: str | Path, n_shards: int = 1,
    vocab_in_params: bool = True,
) -> Path:
    """params.json + consolidated.NN.pth, each shard holding its model-parallel slices and
    Meta's rope.freqs. vocab_in_params=False writes vocab_size -1 as Meta does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in args.to_params_json().items() if k != "max_seq_len"}
    params["vocab_size"] = args.vocab_size if vocab_in_params else -1
    (directory / "params.json").write_text(json.dumps(params))
    freqs = rope_frequencies(args.head_dim, args.rope_theta)
    for i in range(n_shards):
        shard = {name: _slice(name, t, i, n_shards) for name, t in state.items()}
        shard["rope.freqs"] = freqs
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory


def _slice(name: str, t: Tensor, i: int, n: int) -> Tensor:
    axis = merge_axis(name)
    if axis is None or n == 1:
        return t.clone()
    return t.chunk(n, dim=axis)[i].clone()


def hf_state(state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Meta names -> HF names, wq/wk permuted for rotate_half (k with n_kv_heads)."""
    out = {}
    for name, t in state.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t.contiguous()
            continue
        _, i, *rest = name.split(".")
        key = ".".join(rest[:-1])
        if key == "attention.wq":
            t = permute(t, args.n_heads)
        elif key == "attention.wk":
            t = permute(t, args.kv_heads)
        out[f"model.layers.{i}.{_HF_LAYER[key]}.weight"] = t.contiguous()
    return out


def hf_config(args: ModelArgs, tied: bool = False) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": tied,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def write_hf(
    state: dict[str, Tensor], args: ModelArgs, directory: str | Path, n_shards: int = 1,
    tied: bool = False, torch_bin: bool = False,
) -> Path:
    """config.json + model.safetensors, or n_shards files with an index json; torch_bin
    writes pytorch_model.bin instead. tied: lm_head is left out (tie_word_embeddings)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(args, tied)))
    tensors = hf_state(state, args)
    if tied:
        tensors.pop("lm_head.weight")
    if torch_bin:
        torch.save(tensors, directory / "pytorch_model.bin")
        return directory
    if n_shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / fname),
                  metadata={"format": "pt"})
        weight_map |= {n: fname for n in group}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def write_llama2c(
    state: dict[str, Tensor], args: ModelArgs, path: str | Path, version: int = 0,
    shared: bool = True,
) -> Path:
    """A llama2.c .bin (version 0 = legacy header, 1 = "ak42" v1), fp32."""
    path = Path(path)
    vocab = args.vocab_size if shared or version == 1 else -args.vocab_size
    ints = (args.dim, args.ffn_hidden_dim, args.n_layers, args.n_heads, args.kv_heads, vocab,
            args.max_seq_len)
    if version == 0:
        header = struct.pack("<7i", *ints)
    else:
        header = struct.pack("<Ii7iB", MAGIC, 1, *ints, int(shared))
        header += b"\0" * (V1_HEADER_BYTES - len(header))
    cos, sin = rope_tables(args.max_seq_len, args.head_dim, args.rope_theta)
    tables = iter((cos, sin))
    with path.open("wb") as f:
        f.write(header)
        for name, _shape in tensor_layout(args, shared, version):
            t = state[name] if name else next(tables)
            f.write(t.detach().to(torch.float32).numpy().astype(np.dtype("<f4")).tobytes())
    return path


def random_transformer(args: ModelArgs, seed: int = 0) -> Transformer:
    """A fp32 model with random weights everywhere, norms included (so a mixed-up norm or a
    missing permutation changes the logits), for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.08))
            if p.dim() == 1:
                p.add_(1.0)
    return model.eval()

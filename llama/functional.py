"""The model's maths as plain functions: RMSNorm, RoPE application, attention, and the whole
fused block (`fast_block`), which llama/model.py's modules call.

Each function says its shapes. `fast_block` is what TransformerBlock computes, written for
the fewest torch calls: a small model's decode step is bound by Python and dispatch, not by
arithmetic (bench/ops.py measures the alternatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.cache import KVCache
from llama.int8 import gemm_dtype

# What a fast block multiplies by: a weight tensor, or a module (llama.int8.Int8Linear).
Product = Tensor | nn.Module


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What every layer of one forward call shares.

    rot: RoPE rotors, (T, 1, D/2) complex64 or (T, 1, D/2, 2) fp32 (cos, sin), see `rotate`;
    input_pos: (T,) absolute positions, None without a cache (training);
    mask: (T, T_kv) boolean, or None where SDPA's causal flag (prefill from 0) or nothing
    (decode) is right; kv_len: cached positions attended to, None = the whole cache;
    host_pos: input_pos as the caller gave it, on the host where it was given there (what
    probes read: a host read of a device tensor waits for the device).
    """

    rot: Tensor
    input_pos: Tensor | None
    mask: Tensor | None
    kv_len: int | None
    host_pos: Tensor | None = None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x (..., dim) in Meta's order: x * rsqrt(mean(x^2) + eps) in fp32, rounded to
    x's dtype, then times weight.

    fp32 without autograd (inference) takes the same steps in place: two temporaries instead
    of F.rms_norm's several (bench/ops.py, one thread: 1.35x at TinyLlama's 128-token prefill
    shape, about even at decode). With autograd, F.rms_norm in one call.
    """
    if x.dtype == torch.float32 == weight.dtype:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return F.rms_norm(x, weight.shape, weight, eps)
        inv_rms = (x * x).mean(-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
        return (x * inv_rms).mul_(weight)
    return F.rms_norm(x.float(), weight.shape, None, eps).type_as(x) * weight


def rotate(x: Tensor, rot: Tensor) -> Tensor:
    """RoPE on interleaved pairs of x (B, T, H, D); rot holds per-position rotors.

    rot is complex64 (T, 1, D/2), e^{i m theta} (one complex multiply: the eager path), or
    fp32 (T, 1, D/2, 2) holding (cos, sin) (element-wise: what torch.compile fuses, as
    inductor lacks complex numbers). Computed in fp32, returned in x's dtype. The same maths
    as llama.rope.apply_rope.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    if rot.is_complex():
        out = torch.view_as_real(torch.view_as_complex(pairs) * rot)
    else:
        out = torch.stack(_rotated_pairs(pairs, rot), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, T, H, D)


def _rotated_pairs(pairs: Tensor, rot: Tensor) -> tuple[Tensor, Tensor]:
    """(x0 cos - x1 sin, x0 sin + x1 cos) for pairs (..., D/2, 2), rot (T, 1, D/2, 2)."""
    x0, x1 = pairs.unbind(-1)
    cos, sin = rot.unbind(-1)
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


def rotate_heads_(qkv: Tensor, rot: Tensor, n_heads: int) -> None:
    """Rotate the first n_heads heads of qkv (B, T, heads, D) in place (the q and k heads of a
    fused projection; the value heads after them stay as they are). rot as in `rotate`."""
    pairs = qkv[:, :, :n_heads].unflatten(-1, (-1, 2))  # (B, T, n_heads, D/2, 2), a view
    if rot.is_complex() and qkv.dtype == torch.float32:
        torch.view_as_complex(pairs).mul_(rot)
    elif rot.is_complex():
        pairs.copy_(torch.view_as_real(torch.view_as_complex(pairs.float()) * rot))
    else:
        pairs.copy_(torch.stack(_rotated_pairs(pairs.float(), rot), dim=-1))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA of q (B, T, H, D) over k, v (B, H_kv, T_kv, D) -> (B, T, H, D).

    Decode (T == 1) needs no mask among queries, so the n_rep query heads that share a KV head
    become the rows of one query matrix over it: no K/V expansion (bench/ops.py: faster than
    enable_gqa, repeat_interleave or expand). Longer T uses SDPA's enable_gqa.
    The compiled CPU step (T == 1 with a mask over the whole static cache) spells attention
    out in plain ops, which inductor fuses into its own loops: about 5% more decode tokens/s
    than its SDPA call (shipped and stories15M shapes, alternating runs).
    """
    B, T, H, D = q.shape
    H_kv = k.shape[1]
    if T == 1:
        q = q.reshape(B, H_kv, -1, D)  # (B, H_kv, n_rep, D)
        if mask is not None and q.device.type == "cpu":
            out = _masked_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(B, 1, H, D)  # head h = kv_head * n_rep + row, as in q
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H_kv != H
    )  # (B, H, T, D)
    return out.transpose(1, 2)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D), where mask) v for q (B, H_kv, R, D), k, v (B, H_kv, S, D), mask
    (1, S) boolean; scores and softmax in fp32, as SDPA does."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B,H_kv,R,S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)  # (B, H_kv, R, D)


class FastLayer(NamedTuple):
    """One fused block's tensors (the module's own objects, so in-place updates show)."""

    norm1: Tensor
    eps1: float
    wqkv: Product
    cache: KVCache | None
    wo: Product
    norm2: Tensor
    eps2: float
    w13: Product
    w2: Product
    n_heads: int
    n_kv_heads: int
    head_dim: int


def linear(x: Tensor, w: Product) -> Tensor:
    """x (..., in) times w (out, in)^T, or an int8 module's product.

    A row-major fp32 CPU weight outside autograd goes through oneDNN's inner product
    (`onednn_fp32`); bf16 weights with many rows of x on a CPU without hardware bf16 run in
    fp32 (a prefill GEMM there is several times faster upcast; see llama.int8.gemm_dtype)."""
    if not isinstance(w, Tensor):
        return w(x)
    if (
        w.dtype == torch.float32
        and w.device.type == "cpu"
        and not torch.is_grad_enabled()
        and w.is_contiguous()
        and onednn_fp32()
    ):
        if torch.compiler.is_compiling():  # inductor lowers mkldnn's op for packed weights only
            return onednn_linear(x, w)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")
    if w.dtype == torch.bfloat16 and x.shape[-2] > 1:
        dtype = gemm_dtype(w.dtype, w.device)
        if dtype != w.dtype:
            return F.linear(x.to(dtype), w.to(dtype)).to(x.dtype)
    return F.linear(x, w)


# torch's fp32 F.linear on the CPU runs MKL, whose matrix-vector product uses one thread and
# whose GEMM is slow here; oneDNN's inner product (the op inductor's freezing emits) uses every
# thread on both. `bench/ops.py --only layout` (AMD EPYC Zen 5, 2 threads, weights cycled past
# the cache): decode 1.4-2.0x, 128-row prefill 2.6-5.7x; SmolLM2 decode 30.6 vs 4.7 tokens/s
# beside other jobs (MKL's threads stall there), prefill 3.7x. None = not probed yet.
_ONEDNN_FP32: bool | None = None


@torch.library.custom_op("llama::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    """oneDNN's fp32 inner product as an opaque op: a compiled step calls it as it is (inductor
    would otherwise put MKL's one-thread product in its place)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")


@onednn_linear.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def onednn_fp32() -> bool:
    """Whether this torch build runs fp32 products through oneDNN (`linear`): probed once on
    a small product checked against F.linear; False where the op is missing or disagrees."""
    global _ONEDNN_FP32
    if _ONEDNN_FP32 is None:
        _ONEDNN_FP32 = _probe_onednn()
    return _ONEDNN_FP32


@torch.compiler.disable  # run eagerly even when a compiled step asks first
def _probe_onednn() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.randn(3, 2, 24), torch.randn(40, 24)
    try:
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return got.shape == (3, 2, 40) and torch.allclose(got, F.linear(x, w), atol=1e-4)


def fast_block(x: Tensor, L: FastLayer, s: StepInputs) -> Tensor:
    """TransformerBlock.forward for a fused block: x (B, T, dim) -> (B, T, dim)."""
    B, T, _ = x.shape
    H, H_kv, D = L.n_heads, L.n_kv_heads, L.head_dim
    qkv = linear(rms_norm(x, L.norm1, L.eps1), L.wqkv).view(B, T, -1, D)
    rotate_heads_(qkv, s.rot, H + H_kv)  # (B, T, H + 2 H_kv, D): q, k rotated; v as is
    kv = qkv[:, :, H:].transpose(1, 2)  # (B, 2 H_kv, T, D)
    if s.input_pos is not None:
        assert L.cache is not None, "setup_caches() before a cached forward"
        kv = L.cache.update_kv(s.input_pos, kv)  # (B, 2 H_kv, S_max, D)
        if s.kv_len is not None:
            kv = kv[:, :, : s.kv_len]  # (B, 2 H_kv, T_kv, D)
    out = attend(qkv[:, :, :H], kv[:, :H_kv], kv[:, H_kv:], s.mask)  # (B, T, H, D)
    h = x + linear(out.reshape(B, T, -1), L.wo)
    gate, up = linear(rms_norm(h, L.norm2, L.eps2), L.w13).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, L.w2)

"""Weight-only int8 of our own: int8 weights with one scale per output channel.

A weight W (out, in) is stored as q = round(W / s) in [-127, 127] (int8) and s = max|W_row|
/ 127 (fp32, one per output row): symmetric absmax, what llama.cpp's Q8_0 does per block of
32 instead of per row. W x = s * (q x): the scale factors out of the product, so the kernel
reads one byte per weight, a quarter of fp32 and half of bf16. Activations, norms and
embeddings stay in the model's dtype.

Which kernel (bench/ops.py "int8" rows, on this 2-core AVX-512 machine):
- a few rows of activations (decode): torch's `_weight_int8pack_mm` with bf16 activations
  and scales (int8 x bf16, fp32 accumulation). With fp32 activations the same op is several
  times slower than fp32 `F.linear` (it converts inside its inner loop), so activations are
  rounded to bf16 first;
- many rows (prefill): the int8 weight cast once per call and one dense product, in bf16
  where the CPU multiplies bf16 in hardware, else fp32 (`gemm_dtype`), its outputs scaled
  after: a GEMM is compute-bound, and the int8 kernel runs it at a fraction of the dense
  one's speed.
On devices other than the CPU the weight is dequantised for every product (a memory mode).

Quantisation happens while the checkpoint streams in (`make_quantiser`), so no
full-precision copy of the block weights exists at once; a tied output gets an int8 copy of
the embedding (`quantise_tied_output`); `fuse_int8` then fuses wq|wk|wv and
w1|w3 exactly (per-row scales concatenate with their rows). Such a model cannot be saved
(`llama.checkpoints.save` refuses non-float weights): save the original instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.quant import replace_module

# Up to this many rows of activations go through the int8 kernel; more rows are a GEMM over
# the weight cast to bf16, scaled after. One TinyLlama w1-sized weight (5632 x 2048), 2 threads,
# medians: int8 kernel / cast + GEMM 2.2 / 10.7 ms at 4 rows, 12.8 / 14.2 at 32, 20.0 / 14.2
# at 64, 33.4 / 11.0 at 128.
PACK_MAX_ROWS = 32


def quantise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scale fp32 (out,)) with weight ~= q * scale[:, None].

    An all-zero row gets scale 1 (its q is all zeros either way)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantise(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale[:, None] in `dtype` (out, in), rounded once (|q| <= 127 is exact in bf16)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


@cache
def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there a
    bf16 GEMM is several times faster than fp32 (bench/ops.py); on AVX2-only CPUs it is
    emulated and several times slower."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a many-row product of 16-bit weights in: `dtype` except bf16 on a CPU
    without hardware bf16, where fp32 (upcasting the weight) is faster."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


class Int8Linear(nn.Module):
    """A bias-free Linear holding int8 `weight` (out, in) and fp32 `scale` (out,) buffers."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError(
                f"Int8Linear: expected int8 (out, in) weight and (out,) scale, found "
                f"{q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}"
            )
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.float())
        self._scale_bf16: Tensor | None = None
        self.embedding_copy = False  # True: a tied output's copy (`quantise_tied_output`)

    @classmethod
    def from_weight(cls, weight: Tensor) -> Int8Linear:
        return cls(*quantise(weight))

    def _apply(self, fn: Callable, recurse: bool = True) -> Int8Linear:
        self._scale_bf16 = None  # .to(device): the cached copy would stay behind
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) in any float dtype -> (..., out) in x's dtype."""
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows <= PACK_MAX_ROWS:
            if self._scale_bf16 is None:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self._scale_bf16)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        # W x = s * (q x): the GEMM multiplies the integer weights (exact in bf16) and the
        # scales go on the outputs, so the weight is only cast (a fused q * s pass over the
        # weight measured 3.5x slower than the cast alone).
        dtype = gemm_dtype(torch.bfloat16 if x.device.type == "cpu" else x.dtype, x.device)
        out = F.linear(x.to(dtype), self.weight.to(dtype))
        return (out.float() * self.scale).to(x.dtype)  # scaled in fp32: one rounding, not two

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def fuse_int8(module: nn.Module, parts: tuple[str, ...], fused_name: str) -> bool:
    """`module.<parts>` (Int8Linear, same input size) -> one Int8Linear `fused_name`.

    Exact: rows and their scales are concatenated. False (nothing changed) otherwise."""
    layers = [getattr(module, name, None) for name in parts]
    if not all(type(layer) is Int8Linear for layer in layers):
        return False
    if len({layer.in_features for layer in layers}) != 1:
        return False
    fused = Int8Linear(
        torch.cat([layer.weight for layer in layers]), torch.cat([layer.scale for layer in layers])
    )
    for name in parts:
        delattr(module, name)
    setattr(module, fused_name, fused)
    return True


def is_linear_weight(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of a plain nn.Linear (blocks and output)."""
    if not name.endswith(".weight"):
        return False
    return type(model.get_submodule(name.removesuffix(".weight"))) is nn.Linear


def make_quantiser(device: torch.device) -> Callable[[nn.Module, str, Tensor], bool]:
    """For checkpoints.assemble: every Linear weight (blocks and an untied output) becomes an
    Int8Linear on `device` as it arrives; returns True when it consumed the tensor."""

    def quantise_arriving(model: nn.Module, name: str, tensor: Tensor) -> bool:
        if not is_linear_weight(model, name):
            return False
        layer = Int8Linear.from_weight(tensor).to(device)
        replace_module(model, name.removesuffix(".weight"), layer)
        return True

    return quantise_arriving


def quantise_tied_output(model: nn.Module) -> bool:
    """A Transformer whose output shares the embedding's weight gets an Int8Linear copy of
    it as its output (one byte per weight more; the embedding stays in the model's dtype for
    its row lookups). A tied output is often the largest matrix of a small model (SmolLM2:
    49152 x 576, a fifth of the weights) and its product is read every token. Returns
    whether it changed anything."""
    if not getattr(model, "output_tied", False):
        return False
    model.output = Int8Linear.from_weight(model.tok_embeddings.weight)
    model.output.embedding_copy = True
    model.invalidate_routes()
    return True


def quantise_model(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear of an already-loaded model (fused or not) for Int8Linear."""
    names = [n for n, _ in model.named_parameters() if is_linear_weight(model, n)]
    for name in names:
        weight = model.get_parameter(name)
        replace_module(
            model, name.removesuffix(".weight"), Int8Linear.from_weight(weight).to(weight.device)
        )
    return model

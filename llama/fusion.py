"""Fused projections: wq|wk|wv -> wqkv and w1|w3 -> w13, with Meta names kept on disk.

One matrix product instead of three (attention) or two (SwiGLU) per layer: fewer kernel
launches and Python calls, which is most of a small model's decode time, and one longer
matrix-vector product for large models. The fused weight is the row-wise concatenation,
so `wqkv(x) == cat(wq(x), wk(x), wv(x))` exactly up to floating-point summation order.

Checkpoints keep Meta's names both ways: a fused module's `state_dict()` splits the fused
weight back into `wq.weight`, `wk.weight`, `wv.weight` (copies, so safetensors can save
them), and `load_state_dict` of Meta-named tensors concatenates them into the fused weight
(a load pre-hook). Only plain bias-free `nn.Linear` triples are fused: a module already
swapped for an 8-bit `Linear8bitLt` (llama/quant.py) stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Release = Callable[[Tensor], None]


def fuse_linears(
    module: nn.Module, parts: tuple[str, ...], fused_name: str, release: Release | None = None
) -> bool:
    """Replace `module.<parts>` (plain bias-free nn.Linear, same input) by one `fused_name`.

    Returns False (and changes nothing) when any part is missing, biased, not exactly an
    nn.Linear (e.g. 8-bit), or the parts disagree on dtype/device/input size.
    release(weight) is called on each old weight once copied: a loader whose weights are
    file-mapped passes its page dropper, so the copied pages do not stay resident.
    """
    linears = [getattr(module, name, None) for name in parts]
    if not all(type(lin) is nn.Linear and lin.bias is None for lin in linears):
        return False
    weights = [lin.weight for lin in linears]
    w0 = weights[0]
    if any((w.dtype, w.device, w.shape[1]) != (w0.dtype, w0.device, w0.shape[1]) for w in weights):
        return False
    sizes = [w.shape[0] for w in weights]
    fused = nn.Linear(w0.shape[1], sum(sizes), bias=False, device="meta", dtype=w0.dtype)
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat(weights, 0), requires_grad=w0.requires_grad)
    for name in parts:
        delattr(module, name)
    for w in weights if release is not None else ():
        release(w.detach())
    setattr(module, fused_name, fused)  # replaces the None placeholder
    module.register_state_dict_post_hook(_SplitOnSave(parts, fused_name, sizes))
    module.register_load_state_dict_pre_hook(_FuseOnLoad(parts, fused_name, sizes))
    return True


class _SplitOnSave:
    """state_dict post-hook: `<fused>.weight` -> Meta-named parts (contiguous copies)."""

    def __init__(self, parts: tuple[str, ...], fused: str, sizes: list[int]) -> None:
        self.parts, self.fused, self.sizes = parts, fused, sizes

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        weight = state.pop(prefix + self.fused + ".weight")
        for name, piece in zip(self.parts, weight.split(self.sizes, 0), strict=True):
            state[prefix + name + ".weight"] = piece.clone()


class _FuseOnLoad:
    """load_state_dict pre-hook: Meta-named parts -> `<fused>.weight` (one concatenation)."""

    def __init__(self, parts: tuple[str, ...], fused: str, sizes: list[int]) -> None:
        self.parts, self.fused, self.sizes = parts, fused, sizes

    def __call__(
        self,
        module: nn.Module,
        state: dict[str, Any],
        prefix: str,
        _meta: Any,
        _strict: bool,
        _missing: list[str],
        _unexpected: list[str],
        error_msgs: list[str],
    ) -> None:
        keys = [prefix + name + ".weight" for name in self.parts]
        present = [k for k in keys if k in state]
        if not present:
            return  # already fused names, or missing: load_state_dict reports it
        if len(present) < len(keys):
            absent = sorted(set(keys) - set(present))
            error_msgs.append(f"{', '.join(absent)}: missing (needed with {', '.join(present)})")
            return
        dim = getattr(module, self.fused).weight.shape[1]
        bad = _shape_errors(state, keys, self.sizes, dim)
        if bad:
            error_msgs.extend(bad)
            for k in keys:  # the shape errors name the Meta keys; don't also list them unexpected
                state.pop(k)
            return
        state[prefix + self.fused + ".weight"] = _cat_popped(state, keys)


def store_column_major(linear: nn.Linear, release: Release | None = None) -> bool:
    """Keep `linear.weight`'s values but store them column-major: an (in, out) contiguous
    tensor seen through its transpose, so F.linear runs x @ W^T as a product with a
    row-major (in, out) matrix. For a matrix-vector product with short rows (small `in`)
    MKL streams that layout faster (bench/ops.py, "output layout"). state_dict, load_state_dict
    (which copies in place) and every reader see the same (out, in) values. Returns False
    when it is already column-major or not a plain bias-free nn.Linear.
    """
    if type(linear) is not nn.Linear or linear.bias is not None:
        return False
    w = linear.weight
    if w.dim() != 2 or w.stride() == (1, w.shape[0]):
        return False
    with torch.no_grad():
        linear.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
    if release is not None:
        release(w.detach())
    return True


def _shape_errors(state: dict[str, Any], keys: list[str], rows: list[int], cols: int) -> list[str]:
    errors = []
    for key, n in zip(keys, rows, strict=True):
        t = state[key]
        found = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        if not isinstance(t, Tensor) or tuple(t.shape) != (n, cols):
            errors.append(f"{key}: expected shape ({n}, {cols}), found {found}")
    return errors


def _cat_popped(state: dict[str, Any], keys: list[str]) -> Tensor:
    parts = [state.pop(k) for k in keys]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:  # mixed precision on disk: settle on the first part's dtype
        parts = [p.to(parts[0].dtype) for p in parts]
    return torch.cat(parts, 0)


# Module path suffix -> (parts in fused order, fused name), as Attention and FeedForward fuse.
FUSED_GROUPS = {"attention": (("wq", "wk", "wv"), "wqkv"), "feed_forward": (("w1", "w3"), "w13")}


class StreamFuser:
    """Joins each layer's wq|wk|wv and w1|w3 as a checkpoint streams in, where the tensors
    were read (the host): the device then receives only fused weights. Fusing after the copy
    left the originals in CUDA's caching allocator (~8.4 GiB reserved after loading 7B).

    `add(name, tensor)` -> (consumed, fused): consumed is False for a name outside the
    groups; fused is (fused name, weight) once a group's last part arrived, else None.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Tensor]] = {}

    def add(self, name: str, t: Tensor) -> tuple[bool, tuple[str, Tensor] | None]:
        module, _, leaf = name.removesuffix(".weight").rpartition(".")
        prefix, _, kind = module.rpartition(".")
        group = FUSED_GROUPS.get(kind) if name.endswith(".weight") else None
        if group is None or leaf not in group[0] or not prefix.startswith("layers."):
            return False, None
        parts, fused = group
        held = self.pending.setdefault(module, {})
        held[leaf] = t
        if len(held) < len(parts):
            return True, None
        del self.pending[module]
        with torch.no_grad():
            weight = torch.cat([held[p] for p in parts], 0)
        return True, (f"{module}.{fused}.weight", weight)

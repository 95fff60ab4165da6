"""Dequantise GGUF tensors (ggml's block formats) to float, in torch.

Each quantised type stores a row as blocks of `block` values in `nbytes` bytes: fp16 scales
(and minimums) plus packed small integers. The layouts are ggml's (ggml-common.h block_q4_0
... block_q6_k; QK_K = 256 values per K-quant super-block). Results equal the `gguf`
package's numpy dequantiser bit for bit (tests/test_gguf.py checks every type) and are
faster: figures in `one_thread`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

QK_K = 256

# ggml type id -> (name, values per block, bytes per block)
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
}  # fmt: skip
_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def type_name(ggml_type: int) -> str:
    """ggml's name for a type id, including the ones we do not read ("IQ2_XXS", ...)."""
    if ggml_type in TYPES:
        return TYPES[ggml_type][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"unknown type {ggml_type}"


def nbytes(ggml_type: int, n_values: int) -> int:
    _, block, size = TYPES[ggml_type]
    return n_values // block * size


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """Bytes of one tensor (uint8, as stored) -> a tensor of `shape`.

    F32/F16/BF16 come back as views of `raw` in their own dtype (the caller converts);
    quantised types as new fp32 tensors. The innermost dimension must be a whole number of
    blocks (the caller checks).
    """
    if ggml_type in _FLOATS:
        return raw.view(_FLOATS[ggml_type]).view(shape)
    blocks = raw.view(-1, TYPES[ggml_type][2])  # (N, bytes per block)
    with one_thread():
        return _KERNELS[ggml_type](blocks).view(shape)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block kernels on one thread, restoring the setting after.

    Their elementwise ops on a few hundred thousand bytes each lose more to thread hand-offs
    than they gain: SmolLM2's dequantisation took 0.6-0.7 s on one thread and 6-6.6 s on two
    on this 2-core machine while it was shared (gguf.quants.dequantize: 1.0-3.3 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _f16(blocks: Tensor, at: int) -> Tensor:
    """The fp16 at byte `at` of every block as fp32, (N, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _unpack(packed: Tensor, shifts: tuple[int, ...], mask: int, width: int) -> Tensor:
    """(N, bytes) uint8 -> (N, bytes // width, len(shifts), width): (byte >> shift) & mask.

    ggml packs sub-byte values in runs of `width` bytes: the first run of values sits in the
    lowest bits of the run's bytes, the next run in the next bits, and so on.
    """
    s = torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)
    return (packed.reshape(packed.shape[0], -1, 1, width) >> s) & mask


def _nibbles(packed: Tensor, width: int) -> Tensor:
    return _unpack(packed, (0, 4), 0x0F, width)


def _bits(packed: Tensor, width: int) -> Tensor:
    """Bit j of a little-endian bitfield per value: (N, 8 * bytes // width, width) in 0..1."""
    n = packed.shape[0]
    return _unpack(packed, tuple(range(8)), 1, width).view(n, -1, width)


# Each kernel scales its fresh fp32 values in place: a second tensor-sized buffer would raise
# the load's peak (SmolLM2's Q8_0 embedding is 113 MB in fp32).


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 16).view(b.shape[0], 32)
    return (q.to(torch.int8) - 8).float().mul_(_f16(b, 0))


def _q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 16).view(b.shape[0], 32)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _five_bit(low: Tensor, high: Tensor) -> Tensor:
    """32 values per block: 4 low bits from nibbles, the 5th from a 32-bit mask."""
    n = low.shape[0]
    return _nibbles(low, 16).view(n, 32) | (_bits(high, 1).view(n, 32) << 4)


def _q5_0(b: Tensor) -> Tensor:
    q = _five_bit(b[:, 6:], b[:, 2:6])
    return (q.to(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b: Tensor) -> Tensor:
    q = _five_bit(b[:, 8:], b[:, 4:8])
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: Tensor) -> Tensor:
    n, scales = b.shape[0], b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _unpack(b[:, 16:80], (0, 2, 4, 6), 3, 32).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).view(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 96:104], 8).reshape(n, 16)
    high = _unpack(b[:, 104:108], (0, 2, 4, 6), 3, 4).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).view(n, 16, 1)
    ql = _unpack(b[:, 32:96], (0, 2, 4, 6), 3, 32).reshape(n, 16, 16)
    # The high bit is a "not set means subtract 4" flag.
    qh = (_bits(b[:, :32], 32).reshape(n, 16, 16) ^ 1) << 2
    return (ql.to(torch.int8) - qh.to(torch.int8)).float().mul_(dl).view(n, QK_K)


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit minimums packed in 12 bytes -> (N, 8) each."""
    p = packed.reshape(-1, 3, 4)
    d, m, both = p[:, 0], p[:, 1], p[:, 2]
    sc = torch.cat([d & 0x3F, (both & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (both >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_affine(b: Tensor, q: Tensor) -> Tensor:
    """d * scale * q - dmin * min over 8 sub-blocks of 32 (Q4_K, Q5_K)."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    return q.float().mul_(d).sub_(dm).view(n, QK_K)


def _q4_k(b: Tensor) -> Tensor:
    return _k_affine(b, _nibbles(b[:, 16:], 32).reshape(b.shape[0], 8, 32))


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    return _k_affine(b, low | (_bits(b[:, 16:48], 32) << 4))


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).view(n, 16, 1)
    low = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    high = _unpack(b[:, 128:192], (0, 2, 4, 6), 3, 32).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).view(n, 16, 16).float()
    return q.mul_(d).view(n, QK_K)


_KERNELS: dict[int, Callable[[Tensor], Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}  # fmt: skip

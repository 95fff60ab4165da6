"""Preallocated key/value cache for one attention layer.

Buffers are (B, H_kv, S_max, D): only the KV heads are stored, so a GQA model with
n_kv_heads = n_heads / 8 keeps an eighth of the MHA cache. Positions are written in place
(`index_copy_`) so decoding never reallocates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CacheOverflowError(RuntimeError):
    """A write would go past the preallocated capacity (max_seq_len)."""


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, H_kv, S_max, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold (max_seq_len)."""
        return self.k.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, D) at positions input_pos (T,); return the full buffers."""
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, input_pos, k)
        self.v[:batch].index_copy_(2, input_pos, v)
        return self.k[:batch], self.v[:batch]

    def nbytes(self, positions: int | None = None) -> int:
        """Bytes of K and V for `positions` filled positions (default: the whole capacity)."""
        b, h, s, d = self.k.shape
        n = s if positions is None else positions
        return 2 * b * h * n * d * self.k.element_size()

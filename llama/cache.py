"""Preallocated key/value cache for one attention layer.

Keys and values share one buffer `kv` of shape (B, 2 * H_kv, S_max, D): heads [0, H_kv) are
keys, [H_kv, 2 H_kv) values, so a fused qkv projection writes both with one `index_copy_`.
`k` and `v` are (B, H_kv, S_max, D) views of it. Only the KV heads are stored, so a GQA
model with n_kv_heads = n_heads / 8 keeps an eighth of the MHA cache. Positions are written
in place, so decoding never reallocates and the shapes never change (what CUDA graphs need).
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
        self.n_kv_heads = n_kv_heads
        shape = (batch_size, 2 * n_kv_heads, max_seq_len, head_dim)  # (B, 2 H_kv, S_max, D)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> Tensor:
        """Keys (B, H_kv, S_max, D), a view of `kv`."""
        return self.kv[:, : self.n_kv_heads]

    @property
    def v(self) -> Tensor:
        """Values (B, H_kv, S_max, D), a view of `kv`."""
        return self.kv[:, self.n_kv_heads :]

    @property
    def capacity(self) -> int:
        """Positions the buffers hold (max_seq_len)."""
        return self.kv.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, D) at positions input_pos (T,); return the full k, v views."""
        batch, h = k.shape[0], self.n_kv_heads
        kv = self.kv[:batch]
        kv[:, :h].index_copy_(2, input_pos, k)
        kv[:, h:].index_copy_(2, input_pos, v)
        return kv[:, :h], kv[:, h:]

    def update_kv(self, input_pos: Tensor, kv: Tensor) -> Tensor:
        """Write keys and values stacked as kv (B, 2 H_kv, T, D); return the (B, 2 H_kv, S_max, D)
        buffer rows for this batch."""
        buffer = self.kv if kv.shape[0] == self.kv.shape[0] else self.kv[: kv.shape[0]]
        return buffer.index_copy_(2, input_pos, kv)

    def nbytes(self, positions: int | None = None) -> int:
        """Bytes of K and V for `positions` filled positions (default: the whole capacity)."""
        b, h2, s, d = self.kv.shape
        n = s if positions is None else positions
        return b * h2 * n * d * self.kv.element_size()

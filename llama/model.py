"""The LLaMA-2 transformer (Touvron et al. 2023), following Meta's reference llama/model.py.

Parameter names are Meta's (tok_embeddings, layers.{i}.attention.wq, feed_forward.w1, ...), so
a Meta state dict loads with no renaming. Attention covers MHA, GQA and MQA with a KV cache
that stores only the KV heads; scaled_dot_product_attention does the work.

`Transformer.forward(tokens, input_pos)`:
- without input_pos: a plain causal forward over the T tokens (training, full-sequence checks);
- with input_pos (absolute positions, shape (T,)): prefill or decode through the KV cache set
  up by `setup_caches`. Queries attend to every cached position <= their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.cache import CacheOverflowError, KVCache
from llama.config import ModelArgs
from llama.rope import apply_rope, rope_tables


@dataclass(frozen=True)
class AttentionCapture:
    """What one attention layer saw in one forward call, for probes (llama/probes.py).

    q_raw/k_raw: (B, T, H or H_kv, D) before RoPE; q: (B, H, T, D) after RoPE;
    keys/values: (B, H_kv, T_kv, D) all cached positions attended to (RoPE applied to keys);
    out: (B, H, T, D) the attention output, before the wo projection.
    """

    layer: int
    input_pos: Tensor
    q_raw: Tensor
    k_raw: Tensor
    q: Tensor
    keys: Tensor
    values: Tensor
    out: Tensor


AttentionObserver = Callable[[AttentionCapture], None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None
        # Called with an AttentionCapture when set; None keeps the fast path untouched.
        self.observer: AttentionObserver | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor | None,
        mask: Tensor | None,
        kv_len: int,
    ) -> Tensor:
        B, T, _ = x.shape
        q_raw = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k_raw = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        q = apply_rope(q_raw, cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k_raw, cos, sin).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.transpose(1, 2)  # (B, H_kv, T, D)
        if input_pos is not None:
            assert self.cache is not None, "setup_caches() before a cached forward"
            k_all, v_all = self.cache.update(input_pos, k, v)
            k, v = k_all[:, :, :kv_len], v_all[:, :, :kv_len]  # (B, H_kv, T_kv, D)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        if self.observer is not None:
            self.observer(AttentionCapture(self.layer_id, input_pos if input_pos is not None
                                           else torch.arange(T), q_raw, k_raw, q, k, v, out))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor | None,
        mask: Tensor | None,
        kv_len: int,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.max_seq_len, args.head_dim, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S_max, D/2) fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    def setup_caches(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> None:
        """Preallocate every layer's KV cache for max_seq_len positions."""
        ref = self.tok_embeddings.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        a = self.args
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, a.kv_heads, a.max_seq_len, a.head_dim, dtype, ref.device
            )

    def caches(self) -> list[KVCache]:
        return [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]

    def set_observer(self, observer: AttentionObserver | None, layers: set[int] | None = None) -> None:
        """Attach `observer` to the given layers (all when None) and detach it from the rest."""
        for i, layer in enumerate(self.layers):
            wanted = observer is not None and (layers is None or i in layers)
            layer.attention.observer = observer if wanted else None

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, last_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32; (B, 1, vocab) when last_only."""
        T = tokens.shape[1]
        if input_pos is None:
            positions, mask, kv_len = torch.arange(T, device=tokens.device), None, T
        else:
            # One host read of the last position per forward (not per layer).
            kv_len = int(input_pos[-1]) + 1
            positions, mask = input_pos, self._cache_mask(input_pos, T, kv_len)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _cache_mask(self, input_pos: Tensor, T: int, kv_len: int) -> Tensor | None:
        """None where SDPA's own masking is right, else an explicit (T, T_kv) boolean mask.

        Decode (T == 1) sees every cached position; a prefill starting at 0 is plainly causal.
        A chunk starting later needs the explicit mask: is_causal aligns top-left.
        """
        if kv_len > self.args.max_seq_len:
            raise CacheOverflowError(
                f"position {kv_len - 1} is past the KV cache capacity of "
                f"{self.args.max_seq_len} positions (max_seq_len)"
            )
        if T == 1 or kv_len == T:
            return None
        keys = torch.arange(kv_len, device=input_pos.device)
        return keys[None, :] <= input_pos[:, None]  # (T, T_kv)

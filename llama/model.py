"""The LLaMA-2 transformer (Touvron et al. 2023), following Meta's reference llama/model.py.

Parameter names are Meta's (tok_embeddings, layers.{i}.attention.wq, feed_forward.w1, ...), so
a Meta state dict loads with no renaming. Attention covers MHA, GQA and MQA with a KV cache
that stores only the KV heads; scaled_dot_product_attention does the work.

`Transformer.forward(tokens, input_pos)`:
- without input_pos: a plain causal forward over the T tokens (training, full-sequence checks);
- with input_pos (absolute positions, shape (T,)): prefill or decode through the KV cache set
  up by `setup_caches`. Queries attend to every cached position <= their own.

Speed (bench/decode.py, bench/ops.py): `prepare_for_decode()`, which `llama.checkpoints.load`
calls, makes wq|wk|wv and w1|w3 one product each (`fuse_projections`, llama/fusion.py; state
dicts keep Meta names); fp32 CPU products run through oneDNN (functional.linear);
RoPE is one complex multiply over q and k; keep input_pos on the CPU (reading the cache
length then costs no device sync); `llama.runtime_opts.compile_decode` installs a compiled
static-shape step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.cache import CacheOverflowError, KVCache
from llama.config import ModelArgs
from llama.functional import (
    FastLayer,
    Product,
    StepInputs,
    attend,
    fast_block,
    linear,
    onednn_fp32,
    rms_norm,
    rotate,
)
from llama.fusion import Release, fuse_linears, store_column_major
from llama.int8 import Int8Linear, fuse_int8
from llama.memory import check_cache
from llama.rope import complex_rope, rope_tables


@dataclass(frozen=True)
class AttentionCapture:
    """What one attention layer saw in one forward call, for probes (llama/probes/capture.py).

    input_pos: (T,) absolute positions, where the caller keeps them (generate: on the host,
    so that reading them never waits for the device);
    q_raw/k_raw: (B, T, H or H_kv, D) before RoPE; q: (B, H, T, D) after RoPE;
    keys/values: (B, H_kv, T_kv, D) all cached positions attended to (RoPE applied to keys);
    out: (B, H, T, D) the attention output, before the wo projection. An observer may zero
    parts of it in place (head ablation, llama/probes/ablation.py): wo reads that storage.
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


@dataclass(frozen=True)
class ResidualCapture:
    """The residual stream after block `layer` in one forward call (llama/probes/lens.py).

    h: (B, T, dim) as the next block reads it; positions (T,) absolute. lens: (B, rows, vocab)
    fp32, the final norm and output projection on h's last `rows` positions (the logit lens;
    None when the observer asked for rows=0). Under tensor parallelism `lens` is the whole
    vocabulary on rank 0 (model.share_lens gathers the split output projection). Observers
    must not write to `lens`: the last layer's is also the forward's logits in a decode step.
    """

    layer: int
    positions: Tensor
    h: Tensor
    lens: Tensor | None


ResidualObserver = Callable[[ResidualCapture], None]


# Where fp32 products run through MKL (no oneDNN, functional.onednn_fp32), the output
# projection's decode product (1 x dim by dim x vocab) runs faster on the CPU with
# the weight stored column-major while rows are short (bench/ops.py "output layout", 2-core
# AVX-512 machine, fp32, vocab 32000, medians over this machine's runs: dim 288-768 1.1-1.7x,
# 1024 1.0-1.1x; from 2048 up within +-10%, so left as loaded).
COLUMN_MAJOR_MAX_DIM = 1024


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        self.wqkv: nn.Linear | None = None  # set by fuse(); then wq, wk, wv are gone
        self.cache: KVCache | None = None
        # Called with an AttentionCapture when set; None keeps the fast route untouched.
        # Set it through Transformer.set_observer, which also re-chooses the route.
        self.observer: AttentionObserver | None = None

    def fuse(self, release: Release | None = None) -> bool:
        """wq|wk|wv -> wqkv (llama/fusion.py; llama/int8.py for int8). False for bitsandbytes."""
        parts = ("wq", "wk", "wv")
        return (
            self.wqkv is not None
            or fuse_linears(self, parts, "wqkv", release)
            or fuse_int8(self, parts, "wqkv")
        )

    def _project(self, x: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q_raw (B,T,H,D), k_raw (B,T,H_kv,D) before RoPE; q, k after; v (B,T,H_kv,D)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None:
            q_raw = self.wq(x).view(B, T, H, D)  # (B, T, H, D)
            k_raw = self.wk(x).view(B, T, H_kv, D)  # (B, T, H_kv, D)
            v = self.wv(x).view(B, T, H_kv, D)  # (B, T, H_kv, D)
            return q_raw, k_raw, rotate(q_raw, rot), rotate(k_raw, rot), v
        qkv = self.wqkv(x).view(B, T, H + 2 * H_kv, D)  # (B, T, H + 2 H_kv, D)
        qk_raw, v = qkv[:, :, : H + H_kv], qkv[:, :, H + H_kv :]
        qk = rotate(qk_raw, rot)  # q and k heads are adjacent: one rotation for both
        return qk_raw[:, :, :H], qk_raw[:, :, H:], qk[:, :, :H], qk[:, :, H:], v

    def forward(self, x: Tensor, s: StepInputs) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        B, T, _ = x.shape
        q_raw, k_raw, q, k, v = self._project(x, s.rot)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D)
        if s.input_pos is not None:
            assert self.cache is not None, "setup_caches() before a cached forward"
            k, v = self.cache.update(s.input_pos, k, v)
            if s.kv_len is not None:
                k, v = k[:, :, : s.kv_len], v[:, :, : s.kv_len]  # (B, H_kv, T_kv, D)
        out = attend(q, k, v, s.mask)  # (B, T, H, D)
        if self.observer is not None:
            pos = s.host_pos if s.host_pos is not None else torch.arange(T)
            q, out = q.transpose(1, 2), out.transpose(1, 2)  # (B, H, T, D)
            self.observer(AttentionCapture(self.layer_id, pos, q_raw, k_raw, q, k, v, out))
            out = out.transpose(1, 2)
        return self.wo(out.reshape(B, T, -1))  # (B, T, H*D) -> (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Linear | None = None  # set by fuse(); then w1, w3 are gone

    def fuse(self, release: Release | None = None) -> bool:
        """w1|w3 -> w13 (llama/fusion.py; llama/int8.py for int8). False for bitsandbytes."""
        return (
            self.w13 is not None
            or fuse_linears(self, ("w1", "w3"), "w13", release)
            or fuse_int8(self, ("w1", "w3"), "w13")
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + ffn(norm(h)).

    Two routes compute the same thing: this module route (any Linear type, the observer,
    readable), and for a fused block of plain Linears with no observer `fast_block` over
    `fast_parts()`: the same maths in the fewest torch calls, reading no module attributes
    (a small model decodes at the speed of Python; see bench/ops.py).
    """

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, s: StepInputs) -> Tensor:
        parts = self.fast_parts()
        if parts is not None:
            return fast_block(x, parts, s)
        h = x + self.attention(self.attention_norm(x), s)
        return h + self.feed_forward(self.ffn_norm(h))

    def fast_parts(self) -> FastLayer | None:
        """The tensors the fast route reads, or None when it does not apply."""
        att, ffn = self.attention, self.feed_forward
        if att.observer is not None or att.wqkv is None or ffn.w13 is None:
            return None
        products = [_product(m) for m in (att.wqkv, att.wo, ffn.w13, ffn.w2)]
        if any(p is None for p in products):
            return None  # e.g. bitsandbytes or tensor-parallel subclasses: their forward must run
        wqkv, wo, w13, w2 = products
        n1, n2 = self.attention_norm, self.ffn_norm
        return FastLayer(
            n1.weight,
            n1.eps,
            wqkv,
            att.cache,
            wo,
            n2.weight,
            n2.eps,
            w13,
            w2,
            att.n_heads,
            att.n_kv_heads,
            att.head_dim,
        )


def _product(linear: nn.Module) -> Product | None:
    """What fast_block multiplies by for this module: a plain Linear's weight, an Int8Linear
    itself, None for anything else."""
    if type(linear) is nn.Linear:
        return linear.weight
    return linear if type(linear) is Int8Linear else None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # RoPE rotors are plain attributes, not buffers: model.to(bf16) must not round them,
        # and a model built on the meta device must still get real tables. Built lazily.
        self._rotors: dict[tuple[torch.device, bool], Tensor] = {}
        # The fast route's tensors, chosen again after `invalidate_routes` (every method here
        # that changes modules, weights, caches or observers calls it; code that swaps
        # modules from outside, like 8-bit quantisation, calls it too).
        self._observed = False
        # Called after every block when set (set_residual_observer); None costs one test per
        # forward. lens_rows: positions the lens is applied to for it.
        self.residual_observer: ResidualObserver | None = None
        self.lens_rows = 0
        self.lens_layers: frozenset[int] | None = None  # None: the lens at every layer
        self._fast: list[FastLayer] | None = None
        self._routes_stale = True
        # Set by llama.runtime_opts.compile_decode: (tokens (B,1), input_pos (1,), kv_len) ->
        # logits, kv_len being the positions filled after this step (a host int).
        self.compiled_decode: Callable[[Tensor, Tensor, int], Tensor] | None = None

    @property
    def rope_cos(self) -> Tensor:
        """cos(m theta_i), (max_seq_len, D/2) fp32 on CPU."""
        return self._rope_table(torch.device("cpu"), complex_=True).real

    @property
    def rope_sin(self) -> Tensor:
        """sin(m theta_i), (max_seq_len, D/2) fp32 on CPU."""
        return self._rope_table(torch.device("cpu"), complex_=True).imag

    def fuse_projections(self, release: Release | None = None) -> int:
        """Fuse wq|wk|wv and w1|w3 in every layer (call after loading weights).

        Idempotent; skips modules that are not plain nn.Linear (8-bit). state_dict() keeps
        Meta names and load_state_dict still takes them. Returns how many modules are fused.
        release: called on every replaced weight (e.g. the loader's release_pages, so the
        file-mapped originals stop counting in RSS); leave None for heap tensors.
        """
        fused = 0
        for block in self.layers:
            fused += block.attention.fuse(release) + block.feed_forward.fuse(release)
        self.invalidate_routes()
        return fused

    def prepare_for_decode(self, release: Release | None = None) -> int:
        """What `llama.checkpoints.load` does once the weights are in: `fuse_projections`,
        and on the CPU in fp32 without oneDNN (functional.onednn_fp32) an untied output
        projection with dim <= COLUMN_MAJOR_MAX_DIM stored column-major
        (fusion.store_column_major: the same values, a faster MKL matrix-vector product).
        Idempotent; returns how many modules are fused (as fuse_projections) plus one if the
        output was re-laid out by this call."""
        changed = self.fuse_projections(release)
        w = self.output.weight
        if changed and w.device.type == "cuda":
            torch.cuda.empty_cache()  # the unfused originals' blocks, else reserved for good
        if (
            w.device.type == "cpu"
            and w.dtype == torch.float32
            and self.args.dim <= COLUMN_MAJOR_MAX_DIM
            and not self.output_tied
            and not onednn_fp32()  # oneDNN's product reads rows (functional.linear)
        ):
            changed += store_column_major(self.output, release)
        self.invalidate_routes()
        return changed

    @property
    def output_tied(self) -> bool:
        """Whether output.weight and tok_embeddings.weight share storage."""
        out, emb = self.output.weight, self.tok_embeddings.weight
        return out is emb or (out.device == emb.device and out.data_ptr() == emb.data_ptr())

    def setup_caches(
        self, batch_size: int = 1, dtype: torch.dtype | None = None, max_seq_len: int | None = None
    ) -> None:
        """Preallocate every layer's KV cache: max_seq_len positions (default args.max_seq_len).

        A shorter cache saves memory and, in the compiled decode (which attends over the whole
        static cache with a mask), time. Replaces a compiled step's cache (recompiles once).
        """
        ref = self.tok_embeddings.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        a = self.args
        capacity = a.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < capacity <= a.max_seq_len:
            raise ValueError(
                f"max_seq_len: expected 1..{a.max_seq_len} (args.max_seq_len), found {capacity}"
            )
        check_cache(a, batch_size, capacity, dtype, ref.device)  # before allocating
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, a.kv_heads, capacity, a.head_dim, dtype, ref.device
            )
        self.invalidate_routes()

    def caches(self) -> list[KVCache]:
        return [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]

    def set_observer(
        self, observer: AttentionObserver | None, layers: set[int] | None = None
    ) -> None:
        """Attach `observer` to the given layers (all when None) and detach it from the rest."""
        for i, layer in enumerate(self.layers):
            wanted = observer is not None and (layers is None or i in layers)
            layer.attention.observer = observer if wanted else None
        self.invalidate_routes()

    def set_residual_observer(
        self,
        observer: ResidualObserver | None,
        lens_rows: int = 0,
        lens_layers: Collection[int] | None = None,
    ) -> None:
        """Call `observer` with a ResidualCapture after every block (None detaches it); with
        lens_rows > 0 the captures of `lens_layers` (None: all) carry `lens_logits` of the
        last lens_rows positions (each costs one output projection per row)."""
        self.check_lens(lens_rows, lens_layers)
        self.residual_observer, self.lens_rows = observer, lens_rows
        self.lens_layers = None if lens_layers is None else frozenset(map(int, lens_layers))
        self.invalidate_routes()  # the compiled step has no observer calls: leave it while set

    def check_lens(self, lens_rows: int, lens_layers: Collection[int] | None) -> None:
        """ValueError naming the argument when set_residual_observer would refuse it."""
        if lens_rows < 0:
            raise ValueError(f"lens_rows: expected >= 0 positions, found {lens_rows}")
        n = self.args.n_layers
        if lens_layers is not None and any(not 0 <= int(i) < n for i in lens_layers):
            raise ValueError(f"lens_layers: expected layers in 0..{n - 1}, found {lens_layers}")

    def _logits(self, h: Tensor) -> Tensor:
        """The final norm and output projection: h (B, T, dim) -> (B, T, vocab) fp32."""
        product = _product(self.output)
        x = self.norm(h)
        if product is None or torch.is_grad_enabled():  # the module: its hooks (TP's backward)
            return self.output(x).float()
        return linear(x, product).float()

    def lens_logits(self, h: Tensor) -> Tensor:
        """The final norm and output projection on h (B, T, dim) -> (B, T, vocab) fp32: what
        forward applies to the last block's output (nostalgebraist 2020, "logit lens")."""
        return self.share_lens(self._logits(h))

    def share_lens(self, local: Tensor) -> Tensor:
        """The lens logits this process computed as the observer gets them (the identity
        here; gathered over the vocabulary split under tensor parallelism)."""
        return local

    def invalidate_routes(self) -> None:
        """Forget the fast route's cached tensors: call after replacing modules or weights."""
        self._routes_stale = True

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(*args, **kwargs)
        self.invalidate_routes()  # assign=True puts new Parameter objects in place
        return result

    def _fast_layers(self) -> list[FastLayer] | None:
        """Every block's fast-route tensors (None if any block needs its module route), rebuilt
        only after `invalidate_routes`."""
        if self._routes_stale:
            parts = [layer.fast_parts() for layer in self.layers]
            self._fast = None if any(p is None for p in parts) else parts
            self._observed = self.residual_observer is not None or any(
                layer.attention.observer is not None for layer in self.layers
            )
            self._routes_stale = False
        return self._fast

    def _apply(self, fn: Callable, recurse: bool = True) -> Transformer:
        self.invalidate_routes()  # .to()/.half(): parameters may come back as new objects
        return super()._apply(fn, recurse)

    def forward(
        self, tokens: Tensor, input_pos: Tensor | None = None, last_only: bool = False
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32; (B, 1, vocab) when last_only.

        input_pos is best kept on the CPU (it is moved to the model's device): the cache
        length is then read without waiting for the device (generate does so; a device
        input_pos costs one host sync per call).
        """
        T = tokens.shape[1]
        if input_pos is None:
            positions, mask, kv_len = torch.arange(T, device=tokens.device), None, None
            host_pos = None
        else:
            kv_len = self._kv_len(input_pos, T)
            host_pos = input_pos
            positions = input_pos = input_pos.to(tokens.device, non_blocking=True)
            mask = self._cache_mask(input_pos, T, kv_len)
        fast = self._fast_layers()
        if T == 1 and input_pos is not None and self.compiled_decode and not self._observed:
            assert kv_len is not None
            return self.compiled_decode(tokens, input_pos, kv_len)
        table = self._rope_table(tokens.device, complex_=complex_rope(tokens.device))
        rot = table[positions].unsqueeze(1)  # (T, 1, D/2) complex or (T, 1, D/2, 2) real
        s = StepInputs(rot, input_pos, mask, kv_len, host_pos)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        last_lens = None
        if self.residual_observer is not None:
            h, last_lens = self._observed_blocks(h, s, fast, positions)
        elif fast is not None:
            for parts in fast:
                h = fast_block(h, parts, s)
        else:
            for layer in self.layers:
                h = layer(h, s)
        if last_only:
            h = h[:, -1:]
        if last_lens is not None and last_lens.shape[1] == h.shape[1]:
            return last_lens  # the same product on the same rows (a decode step): done once
        return self._logits(h)

    def _observed_blocks(
        self, h: Tensor, s: StepInputs, fast: list[FastLayer] | None, positions: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The blocks with the residual observer called after each (a loop of its own, so
        that the unobserved loops in forward test nothing per layer). -> (h, this process's
        logits of the last layer's lens rows, or None when not lensed)."""
        observer, rows, chosen = self.residual_observer, self.lens_rows, self.lens_layers
        assert observer is not None
        local = None
        for i, layer in enumerate(self.layers):
            h = fast_block(h, fast[i], s) if fast is not None else layer(h, s)
            lens = None
            if rows and (chosen is None or i in chosen):
                local = self._logits(h[:, -rows:])  # (B, rows, V_local)
                lens = self.share_lens(local)
            observer(ResidualCapture(i, positions, h, lens))
        return h, local if chosen is None or len(self.layers) - 1 in chosen else None

    def static_decode(self, tokens: Tensor, input_pos: Tensor, span: int | None = None) -> Tensor:
        """One decode step with static shapes and no host reads (what compile_decode compiles).

        tokens (B, 1), input_pos (1,) on the model's device. Attends over the first `span`
        cache positions (default the whole cache; a compiled step gets one graph per span)
        with a mask `key position <= input_pos`; input_pos must be < span; no overflow check
        (forward does it).
        """
        span = span or self.caches()[0].capacity
        keys = torch.arange(span, device=tokens.device)
        mask = keys[None, :] <= input_pos[:, None]  # (1, span)
        # (1, 1, D/2, 2) real (cos, sin): torch.compile has no complex numbers
        rot = self._rope_table(tokens.device, complex_=False)[input_pos].unsqueeze(1)
        s = StepInputs(rot, input_pos, mask, span)
        h = self.tok_embeddings(tokens)  # (B, 1, dim)
        for layer in self.layers:
            h = layer(h, s)
        return self._logits(h)

    def _kv_len(self, input_pos: Tensor, T: int) -> int:
        """Positions attended to after this call; CacheOverflowError past the capacity."""
        # One host read per forward (free when input_pos is on the CPU), none per layer.
        if input_pos.shape != (T,):
            raise ValueError(
                f"input_pos: expected shape ({T},) (one position per token), "
                f"found {tuple(input_pos.shape)}"
            )
        kv_len = int(input_pos[-1]) + 1
        cache = self.layers[0].attention.cache
        capacity = cache.capacity if cache is not None else self.args.max_seq_len
        if kv_len > capacity:
            raise CacheOverflowError(
                f"position {kv_len - 1} is past the KV cache capacity of {capacity} positions"
            )
        return kv_len

    def _cache_mask(self, input_pos: Tensor, T: int, kv_len: int) -> Tensor | None:
        """None where SDPA's own masking is right, else an explicit (T, T_kv) boolean mask.

        Decode (T == 1) sees every cached position; a prefill starting at 0 is plainly causal.
        A chunk starting later needs the explicit mask: is_causal aligns top-left.
        """
        if T == 1 or kv_len == T:
            return None
        keys = torch.arange(kv_len, device=input_pos.device)
        return keys[None, :] <= input_pos[:, None]  # (T, T_kv)

    def _rope_table(self, device: torch.device, complex_: bool) -> Tensor:
        """(S_max, D/2) complex64 rotors, or (S_max, D/2, 2) fp32 (cos, sin), on `device`."""
        table = self._rotors.get((device, complex_))
        if table is None:
            a = self.args
            with torch.device("cpu"):  # real numbers even when built under a meta context
                cos, sin = rope_tables(a.max_seq_len, a.head_dim, a.rope_theta)
            table = torch.complex(cos, sin) if complex_ else torch.stack((cos, sin), -1)
            table = self._rotors[(device, complex_)] = table.to(device)
        return table

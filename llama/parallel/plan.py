"""Which slice of every LLaMA-2 parameter a tensor-parallel rank holds (Megatron-LM style).

Shoeybi et al. 2019 split a transformer block so that each rank computes whole attention
heads and a slice of the FFN with one all-reduce per sub-block:

- column-parallel (output rows split): wq (query heads), wk/wv (KV heads), w1/w3 (FFN units),
  output (vocabulary rows; the logits are gathered);
- row-parallel (input columns split): wo (query heads), w2 (FFN units); each rank's partial
  product is summed by an all-reduce;
- tok_embeddings: split along the model dimension (Meta's ParallelEmbedding), the embedded
  slices are gathered;
- norms: replicated.

These are exactly the axes of Meta's model-parallel shards (consolidated.NN.pth), so shard i of
an N-shard checkpoint is rank i's slice of an N-rank plan.

GQA: query head h reads KV head h // n_rep. Rank r holds query heads
[r*H/N, (r+1)*H/N); when N divides n_kv_heads it holds KV heads [r*H_kv/N, (r+1)*H_kv/N), the
ones those query heads read. When N is a multiple of n_kv_heads (MQA on 2 ranks, 70B on 16)
each rank holds a copy of the one KV head its query heads read (as vLLM does); the KV cache is
then replicated N/H_kv times. Any other N is refused with a ShardingError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama.config import ModelArgs

_LAYER = re.compile(r"layers\.\d+\.(attention|feed_forward)\.(w[qkvo123])\.weight")


class ShardingError(ValueError):
    """The model cannot be split over this many ranks (the message says why and what works)."""


def even_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are split into `parts` nearly equal
    contiguous parts (the first total % parts parts get one more, as torch.tensor_split)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Slice:
    """Rows (axis 0) or columns (axis 1) [start, stop) of a 2-D weight."""

    axis: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> list[int]:
    """Rank counts this model can be split over (up to `limit`)."""
    return [n for n in range(1, limit + 1) if _refusal(args, n) is None]


def _refusal(args: ModelArgs, n: int) -> str | None:
    h, kv = args.n_heads, args.kv_heads
    if h % n:
        return f"n_heads={h} is not a multiple of {n} (each rank must hold whole query heads)"
    if kv % n and n % kv:
        return (f"n_kv_heads={kv}: {n} ranks must divide it (or be a multiple of it, which "
                "replicates KV heads) so that every rank holds whole KV heads")
    return None


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world_size`: the ranges it owns and the slice of each parameter."""

    args: ModelArgs
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        n = self.world_size
        if not isinstance(n, int) or n < 1 or not 0 <= self.rank < n:
            raise ShardingError(f"rank {self.rank} of world size {n}: expected 0 <= rank < n")
        why = _refusal(self.args, n)
        if why is not None:
            raise ShardingError(
                f"cannot split this {self.args.attention_kind} model over {n} ranks: {why}; "
                f"valid rank counts: {valid_world_sizes(self.args)}"
            )

    # Owned ranges ------------------------------------------------------------------------
    @property
    def heads(self) -> tuple[int, int]:
        """Query heads [start, stop)."""
        per = self.args.n_heads // self.world_size
        return self.rank * per, (self.rank + 1) * per

    @property
    def kv_heads(self) -> tuple[int, int]:
        """KV heads [start, stop): the ones this rank's query heads read."""
        kv, n = self.args.kv_heads, self.world_size
        if kv >= n:
            per = kv // n
            return self.rank * per, (self.rank + 1) * per
        group = self.rank // (n // kv)
        return group, group + 1

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless world_size > n_kv_heads)."""
        return max(1, self.world_size // self.args.kv_heads)

    @property
    def n_local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def local_args(self) -> ModelArgs:
        """The model shape this rank's attention sees: local heads, same head_dim, same
        max_seq_len (what sizes its KV caches). dim and the FFN stay the whole model's."""
        h = self.n_local_heads
        return self.args.replace(dim=h * self.args.head_dim, n_heads=h,
                                 n_kv_heads=self.n_local_kv_heads,
                                 hidden_dim=self.args.ffn_hidden_dim)

    @property
    def ffn(self) -> tuple[int, int]:
        return even_range(self.args.ffn_hidden_dim, self.world_size, self.rank)

    @property
    def vocab(self) -> tuple[int, int]:
        """Rows of the output projection (logits) this rank computes."""
        return even_range(self.args.vocab_size, self.world_size, self.rank)

    @property
    def embed(self) -> tuple[int, int]:
        """Columns of tok_embeddings (model dimensions) this rank holds."""
        return even_range(self.args.dim, self.world_size, self.rank)

    # Per-parameter slices ----------------------------------------------------------------
    def slice_of(self, name: str) -> Slice | None:
        """This rank's slice of the full parameter `name` (Meta naming); None = replicated.

        Raises ShardingError for a name that is not a LLaMA-2 parameter.
        """
        if name.endswith("norm.weight"):
            return None
        if name == "tok_embeddings.weight":
            return Slice(1, *self.embed)
        if name == "output.weight":
            return Slice(0, *self.vocab)
        m = _LAYER.fullmatch(name)
        if m is None:
            raise ShardingError(f"{name!r} is not a LLaMA-2 parameter name")
        d = self.args.head_dim
        q0, q1 = self.heads
        k0, k1 = self.kv_heads
        return {
            "wq": Slice(0, q0 * d, q1 * d), "wk": Slice(0, k0 * d, k1 * d),
            "wv": Slice(0, k0 * d, k1 * d), "wo": Slice(1, q0 * d, q1 * d),
            "w1": Slice(0, *self.ffn), "w3": Slice(0, *self.ffn), "w2": Slice(1, *self.ffn),
        }[m.group(2)]

    def local_shape(self, name: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of this rank's slice of a parameter whose full shape is `full_shape`."""
        s = self.slice_of(name)
        if s is None:
            return tuple(full_shape)
        shape = list(full_shape)
        shape[s.axis] = s.size
        return tuple(shape)

"""`ParallelTransformer`: llama.model.Transformer with every block split over the ranks.

Built on the meta device, then re-shaped by module surgery (llama/model.py is not touched):
each attention's wq/wk/wv/wo and each FFN's w1/w2/w3 become plain `nn.Linear`s of this
rank's slice (see plan.py), and the attention's n_heads/n_kv_heads become the local counts
(its SDPA and KV cache then see only local heads). Plain Linears under the Meta names mean
checkpoints bind by name and the 8-bit swap works on the local slices; once bound,
`seal_row_parallel` turns wo and w2 (whatever their class then) into subclasses whose forward
all-reduces (the row-parallel sum). Fused projections (wqkv, w13) work on the local slices.
tok_embeddings holds a slice of the model dimension (its output is all-gathered); output
holds a slice of the vocabulary (the logits are gathered on rank 0).

On rank 0 every call that runs collectives (forward, setup_caches, set_observer) is first
announced to the workers (control.py), which replay it in `run_worker_loop`. Inputs are
validated before the announcement, so a bad request fails on rank 0 alone and the workers
never see it. The collectives have a backward (comm.py) for gradient x input only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from llama.cache import CacheOverflowError
from llama.config import ModelArgs
from llama.model import (
    AttentionCapture,
    AttentionObserver,
    ResidualCapture,
    ResidualObserver,
    Transformer,
)
from llama.parallel import comm
from llama.parallel.comm import TPContext
from llama.parallel.control import Channel, Op, pickled
from llama.parallel.health import DistributedError, RankFailure, is_comm_error
from llama.parallel.plan import ShardPlan

_CAPTURE_FIELDS = ("q_raw", "k_raw", "q", "keys", "values", "out")
# Concatenation axis of each capture field across ranks, and whether it holds KV heads.
_CAPTURE_AXES = {"q_raw": (2, False), "k_raw": (2, True), "q": (1, False),
                 "keys": (1, True), "values": (1, True), "out": (1, False)}


class ParallelTransformer(Transformer):
    """This rank's part of a tensor-parallel LLaMA-2 (build under `torch.device("meta")`).

    `forward` returns the full fp32 logits (B, T, vocab) on rank 0 and this rank's vocabulary
    slice on the others. `args` stays the whole model's shape; `plan` says what is local.
    """

    def __init__(self, args: ModelArgs, ctx: TPContext) -> None:
        super().__init__(args)
        self.tp = ctx
        self.plan = ShardPlan(args, ctx.rank, ctx.world_size)
        self.channel = Channel(ctx)
        ranges = [ShardPlan(args, r, ctx.world_size).vocab for r in range(ctx.world_size)]
        self._vocab_sizes = [stop - start for start, stop in ranges]  # logits per rank
        self.sealed = False  # seal_row_parallel() once the weights are bound
        _shard_modules(self)

    @property
    def compiled_decode(self) -> None:
        """Always None: a torch.compile'd decode step is not supported across ranks yet."""
        return None

    @compiled_decode.setter
    def compiled_decode(self, value: object) -> None:
        if value is not None:
            raise DistributedError("compile_decode is not supported with tensor parallelism "
                                   "(the compiled step would run collectives untested)")

    # Calls rank 0 announces ------------------------------------------------------------
    def forward(self, tokens: Tensor, input_pos: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """As Transformer.forward; on rank 0 the workers run the same step."""
        if not self.tp.is_leader:
            return self.local_forward(tokens, input_pos, last_only)
        if not self.sealed:
            raise DistributedError("ParallelTransformer: bind the weights, then call "
                                   "seal_row_parallel(model) (load_parallel does both)")
        host_tokens, host_pos = self._check_inputs(tokens, input_pos)
        return self._lead("forward", lambda: self._announce_forward(
            host_tokens, host_pos, last_only, tokens, input_pos))

    def setup_caches(self, batch_size: int = 1, dtype: torch.dtype | None = None,
                     **kwargs: Any) -> None:
        """Transformer.setup_caches on every rank; the caches hold only local KV heads.
        Extra keyword arguments (e.g. max_seq_len) pass through to Transformer's. Checked
        here first: an argument every rank would refuse must not reach the workers."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, found {batch_size!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating torch.dtype or None, found {dtype!r}")
        capacity = kwargs.get("max_seq_len")
        if capacity is not None and not (isinstance(capacity, int)
                                         and 0 < capacity <= self.args.max_seq_len):
            raise ValueError(f"max_seq_len: expected 1..{self.args.max_seq_len}, "
                             f"found {capacity!r}")
        self.broadcast_call("local_setup_caches", batch_size, dtype, **kwargs)

    def set_observer(self, observer: AttentionObserver | None,
                     layers: set[int] | None = None) -> None:
        """As Transformer.set_observer; rank 0's observer sees every rank's heads gathered."""
        chosen = None if layers is None else sorted(int(i) for i in layers)

        def run() -> None:
            if self.tp.distributed:
                payload = torch.tensor([-1] if chosen is None else chosen, dtype=torch.int64)
                self.channel.send(Op.OBSERVE, (int(observer is not None),), payload)
            self.local_set_observer(observer, None if chosen is None else set(chosen))

        self._lead("set_observer", run)

    def set_residual_observer(self, observer: ResidualObserver | None, lens_rows: int = 0,
                              lens_layers: Collection[int] | None = None) -> None:
        """As Transformer.set_residual_observer; the workers get one that only takes part in
        the lens's collectives (the residual stream itself is whole on every rank)."""
        layers = None if lens_layers is None else sorted(int(i) for i in lens_layers)
        self.check_lens(lens_rows, layers)  # before the workers hear of it

        def run() -> None:
            if self.tp.distributed:
                args = (observer is not None, lens_rows, layers)
                self.channel.send(Op.CALL, (), pickled(("local_set_residual_observer", args, {})))
            Transformer.set_residual_observer(self, observer, lens_rows, layers)

        self._lead("set_residual_observer", run)

    def share_lens(self, local: Tensor) -> Tensor:
        """A collective under tensor parallelism: each rank projected onto its vocabulary
        slice; rank 0 gets the whole vocabulary (the others their slice)."""
        return comm.gather_last_to_leader(self.tp, local, self._vocab_sizes)

    def ablate(self, layer: int, heads: list[int], start: int) -> None:
        """Zero query heads `heads` (whole-model numbers) of `layer` from position `start` on
        (llama/probes/ablation.py): each rank zeroes those it holds, before its wo slice.
        set_observer(None) undoes it."""
        self.broadcast_call("local_ablate", int(layer), [int(h) for h in heads], int(start))

    def grad_x_input(self, ids: list[int], target: int) -> Tensor:
        """llama.probes.attribution.grad_x_input with every rank taking part in the forward
        and the backward; rank 0 gets the scores."""
        return self.broadcast_call("local_grad_x_input", [int(i) for i in ids], int(target))

    def broadcast_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `getattr(model, method)(*args, **kwargs)` on every rank (e.g. a post-load
        pass that fuses projections); returns rank 0's result. Arguments must pickle."""
        payload = pickled((method, args, kwargs))

        def run() -> Any:
            if self.tp.distributed:
                self.channel.send(Op.CALL, (), payload)
            return getattr(self, method)(*args, **kwargs)

        return self._lead(f"call {method}", run)

    # What every rank runs --------------------------------------------------------------
    def local_forward(self, tokens: Tensor, input_pos: Tensor | None, last_only: bool) -> Tensor:
        local = super().forward(tokens, input_pos, last_only)  # (B, T, V_local)
        return comm.gather_last_to_leader(self.tp, local, self._vocab_sizes)

    def local_setup_caches(self, batch_size: int, dtype: torch.dtype | None,
                           **kwargs: Any) -> None:
        # Transformer.setup_caches sizes caches from args.kv_heads: show it the local shape
        # (same head_dim and max_seq_len) while it builds them.
        whole = self.args
        self.args = self.plan.local_args
        try:
            super().setup_caches(batch_size, dtype, **kwargs)
        finally:
            self.args = whole

    def local_set_observer(self, observer: AttentionObserver | None,
                           layers: set[int] | None) -> None:
        if observer is None or not self.tp.distributed:
            super().set_observer(observer, layers)
            return

        def gathered(capture: AttentionCapture) -> None:
            full = gather_capture(self.tp, self.plan, capture)
            if full is not None:
                observer(full)

        super().set_observer(gathered, layers)

    def local_set_residual_observer(self, on: bool, lens_rows: int,
                                    lens_layers: list[int] | None = None) -> None:
        """A worker's side of set_residual_observer (rank 0 keeps its own observer)."""
        Transformer.set_residual_observer(self, _discard if on else None, lens_rows, lens_layers)

    def local_ablate(self, layer: int, heads: list[int], start: int) -> None:
        from llama.probes.ablation import Ablation

        first, stop = self.plan.heads
        mine = tuple(h - first for h in heads if first <= h < stop)
        zero = Ablation(layer, mine, start).observer() if mine else None
        Transformer.set_observer(self, zero, {layer})  # local heads: no gather

    def local_grad_x_input(self, ids: list[int], target: int) -> Tensor:
        from llama.probes.attribution import embedding_gradient

        def forward(tokens: Tensor) -> Tensor:
            return self.local_forward(tokens, None, True)

        # Column-parallel inputs (each block's attention and FFN, the output projection)
        # get a backward that sums the ranks' partial gradients.
        copy = comm.copy_to_ranks
        hooks = [m.register_forward_pre_hook(lambda _m, a: (copy(self.tp, a[0]), *a[1:]))
                 for layer in self.layers for m in (layer.attention, layer.feed_forward)]
        hooks.append(self.output.register_forward_pre_hook(lambda _m, a: (copy(self.tp, a[0]),)))
        try:
            return embedding_gradient(self, ids, target, forward, self.tp.is_leader)
        finally:
            for hook in hooks:
                hook.remove()

    # Rank 0 plumbing --------------------------------------------------------------------
    def _lead(self, phase: str, run: Callable[[], Any]) -> Any:
        health = self.tp.health
        if health is None:
            return run()
        if health.failure is not None:
            raise health.failure
        with health.busy(phase):
            try:
                return run()
            except RankFailure:
                raise
            except Exception as exc:
                if is_comm_error(exc):
                    raise health.diagnose(exc) from None
                health.fail(RankFailure(0, self.tp.world_size, f"{type(exc).__name__}: {exc}"))
                raise
            except BaseException:  # Ctrl-C: rank 0 broke off mid-call; release the workers
                health.fail(RankFailure(0, self.tp.world_size, "interrupted"))
                raise

    def _announce_forward(self, host_tokens: Tensor, host_pos: Tensor | None, last_only: bool,
                          tokens: Tensor, input_pos: Tensor | None) -> Tensor:
        if self.tp.distributed:
            b, t = host_tokens.shape
            parts = [host_tokens.reshape(-1)] + ([] if host_pos is None else [host_pos])
            self.channel.send(Op.FORWARD, (b, t, int(input_pos is not None), int(last_only)),
                              torch.cat(parts))
        return self.local_forward(tokens, input_pos, last_only)

    def _check_inputs(self, tokens: Tensor,
                      input_pos: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate on rank 0 what every rank would choke on; -> (tokens, input_pos) on CPU."""
        if tokens.dim() != 2 or tokens.is_floating_point() or 0 in tokens.shape:
            raise ValueError(f"tokens: expected a non-empty (B, T) integer tensor, found "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        host = tokens.detach().to("cpu", torch.int64)
        v = self.args.vocab_size
        if host.min() < 0 or host.max() >= v:
            raise ValueError(f"tokens: ids must lie in [0, {v}), found {host.min()}..{host.max()}")
        if input_pos is None:
            return host, None
        pos = input_pos.detach().to("cpu", torch.int64)
        if pos.shape != (tokens.shape[1],) or pos.min() < 0:
            raise ValueError(f"input_pos: expected ({tokens.shape[1]},) positions >= 0, "
                             f"found {tuple(pos.shape)}")
        caches = self.caches()
        if not caches or caches[0].k.shape[0] < tokens.shape[0]:
            raise ValueError(f"setup_caches({tokens.shape[0]}) before a cached forward")
        if int(pos[-1]) >= caches[0].capacity:
            raise CacheOverflowError(f"position {int(pos[-1])} is past the KV cache capacity "
                                     f"of {caches[0].capacity} positions")
        return host, pos

    # The workers' side ----------------------------------------------------------------
    def execute(self, cmd: Any) -> None:
        """Replay one of rank 0's commands (a control.Command) on this worker."""
        a = cmd.ints
        dev = self.tok_embeddings.weight.device
        if cmd.op == Op.FORWARD:
            b, t, has_pos, last_only = a[:4]
            tokens = cmd.payload[: b * t].view(b, t).to(dev)  # (B, T)
            pos = cmd.payload[b * t:].to(dev) if has_pos else None  # (T,)
            self.local_forward(tokens, pos, bool(last_only))
        elif cmd.op == Op.OBSERVE:
            layers = cmd.payload.tolist()
            chosen = None if layers == [-1] else set(layers)
            self.local_set_observer(_discard if a[0] else None, chosen)
        elif cmd.op == Op.CALL:
            method, args, kwargs = cmd.call()
            getattr(self, method)(*args, **kwargs)


def _discard(capture: AttentionCapture | ResidualCapture) -> None:
    """Workers' observer: their heads (or lens slices) went to rank 0 in the gather."""


def gather_capture(ctx: TPContext, plan: ShardPlan,
                   capture: AttentionCapture) -> AttentionCapture | None:
    """Every rank's heads of one AttentionCapture, concatenated in head order on rank 0.

    A collective: every rank calls it at the same attention call. Returns the whole-model
    capture on rank 0 (q heads from all ranks; KV heads once, skipping replicas) and None
    elsewhere. One gather of all fields, flattened (equal shapes on every rank).
    """
    fields = [getattr(capture, f) for f in _CAPTURE_FIELDS]
    dtype = fields[0].dtype if all(f.dtype == fields[0].dtype for f in fields) else torch.float32
    flat = torch.cat([f.reshape(-1).to(dtype) for f in fields])
    parts = comm.gather_to_leader(ctx, flat)
    if parts is None:
        return None
    sizes = [f.numel() for f in fields]
    per_rank = [p.split(sizes) for p in parts]
    out: dict[str, Tensor] = {}
    for i, (name, f) in enumerate(zip(_CAPTURE_FIELDS, fields, strict=True)):
        axis, kv = _CAPTURE_AXES[name]
        ranks = range(0, ctx.world_size, plan.kv_replicas if kv else 1)
        out[name] = torch.cat([per_rank[r][i].view(f.shape).to(f.dtype) for r in ranks],
                              dim=axis)
    return AttentionCapture(capture.layer, capture.input_pos, **out)


def _shard_modules(model: ParallelTransformer) -> None:
    """Swap every split weight's module for one of the local shape; gather the embedding."""
    plan, ctx = model.plan, model.tp
    for name, param in list(model.named_parameters()):
        if plan.slice_of(name) is None:
            continue
        owner_name, _ = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        rows, cols = plan.local_shape(name, tuple(param.shape))
        if isinstance(owner, nn.Embedding):
            new: nn.Module = nn.Embedding(rows, cols, device=param.device, dtype=param.dtype)
        else:
            new = nn.Linear(cols, rows, bias=False, device=param.device, dtype=param.dtype)
        parent, _, attr = owner_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    for layer in model.layers:
        layer.attention.n_heads = plan.n_local_heads
        layer.attention.n_kv_heads = plan.n_local_kv_heads
    model.invalidate_routes()
    if ctx.distributed:
        model.tok_embeddings.register_forward_hook(
            lambda m, i, out: comm.all_gather_last(ctx, out))


def seal_row_parallel(model: ParallelTransformer) -> None:
    """Make each layer's wo and w2 row-parallel: their output is summed over the ranks.

    Call once the weights are bound (and quantised: the 8-bit swap only takes plain
    nn.Linears). The module keeps its class's behaviour in a subclass whose forward
    all-reduces; being no longer a plain nn.Linear also keeps the model's fused fast path
    (which reads wo.weight directly, without calling the module) off the split model.
    """
    for layer in model.layers:
        for module in (layer.attention.wo, layer.feed_forward.w2):
            if not getattr(module, "row_parallel", False):
                module.__class__ = _row_parallel_class(type(module))
                module.tp_context = model.tp
    model.sealed = True


_ROW_PARALLEL: dict[type, type] = {}


def _row_parallel_class(base: type) -> type:
    if base not in _ROW_PARALLEL:
        def forward(self: nn.Module, x: Tensor) -> Tensor:
            return comm.all_reduce_(self.tp_context, base.forward(self, x))

        _ROW_PARALLEL[base] = type(f"RowParallel{base.__name__}", (base,),
                                   {"forward": forward, "row_parallel": True})
    return _ROW_PARALLEL[base]

"""Tensor-parallel inference over several processes (GPUs) on torch.distributed.

    torchrun --nproc-per-node N app.py --model PATH
    torchrun --nproc-per-node N -m llama chat --model PATH

Every rank runs the same program:

    ctx = init_from_env()                      # reads torchrun's RANK, WORLD_SIZE, ...
    loaded = load_parallel(path, ctx)          # each rank reads only its slice
    try:
        if ctx.is_leader:
            ...  # the app / CLI, using loaded.model like any Transformer
        else:
            run_worker_loop(loaded.model)      # replays rank 0's calls until it stops
    finally:
        shutdown(ctx, loaded.model)            # rank 0 releases the workers

`torchrun --nproc-per-node N -m llama.parallel --model PATH` checks a setup: per-rank
memory, greedy ids and decode speed (llama/parallel/check.py).

Attention heads (query and KV, GQA-aware) and the FFN are split over the ranks, Megatron
style (llama/parallel/plan.py); the embedding and output projection are split too. Rank 0
samples; each forward it makes is first announced to the workers with the tokens to feed (so
the sampled token reaches them), and every rank runs the same step. Observers (probes) on rank
0 receive every rank's heads gathered. NCCL carries the forward's collectives on CUDA, gloo on
CPU; commands always go over gloo.

Failures: a rank that dies, hangs or raises makes rank 0 raise `RankFailure` naming it and
why, within the collective timeout or the heartbeat timeout (llama/parallel/health.py); the
workers then exit by themselves. Ctrl-C under torchrun stops every rank (torchrun signals each
worker; workers exit at once, first noting that a signal stopped them). torchrun also sends
SIGTERM to every rank as soon as one fails: rank 0 then names the rank that failed on its own
(not one stopped by that signal) before it exits with status 1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from llama.checkpoints import default_dtype
from llama.checkpoints.common import LoadedModel, check_vocab, finish, progress_bar
from llama.parallel.comm import SINGLE, TPContext
from llama.parallel.control import Op
from llama.parallel.health import DistributedError, Health, RankFailure, is_comm_error
from llama.parallel.loading import bind, open_sliced, tokenizer_path
from llama.parallel.model import ParallelTransformer, gather_capture, seal_row_parallel
from llama.parallel.plan import ShardingError, ShardPlan, valid_world_sizes

__all__ = [
    "DistributedError", "KVBytes", "ParallelTransformer", "RankFailure", "ShardPlan",
    "ShardingError", "TPContext", "gather_capture", "init_from_env", "kv_cache_bytes",
    "load_parallel", "run_worker_loop", "shutdown", "stop_workers", "valid_world_sizes",
]

DEFAULT_TIMEOUT_S = 60.0  # one collective inside a forward; also LLAMA_TP_TIMEOUT
DEFAULT_HEARTBEAT_TIMEOUT_S = 20.0  # silence that means dead or hung; LLAMA_TP_HEARTBEAT
NCCL_WATCHDOG_MARGIN_S = 30.0  # NCCL's abort comes this long after health's own verdict


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return default if raw is None else float(raw)
    except ValueError:
        raise DistributedError(f"{name}: expected seconds as a number, found {raw!r}") from None


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"{name} is not set: launch with torchrun (it sets RANK, "
                                   "WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer, found {raw!r}") from None


def init_from_env(*, timeout_s: float | None = None, heartbeat_timeout_s: float | None = None,
                  exit_on_failure: bool = False) -> TPContext:
    """Join the run torchrun started (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    WORLD_SIZE unset or 1: a single-process context (no groups; cuda if available).
    timeout_s bounds one collective inside a forward (default LLAMA_TP_TIMEOUT or 60 s);
    heartbeat_timeout_s is the silence after which a rank counts as dead or hung (default
    LLAMA_TP_HEARTBEAT or 20 s). exit_on_failure: rank 0 exits (status 1) a few seconds after
    it learns of a failure even while idle (for servers whose model can no longer run).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return TPContext(device=_device(0))
    if dist.is_initialized():
        raise DistributedError("init_from_env: torch.distributed is already initialised")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT")
    timeout = timeout_s or _env_float("LLAMA_TP_TIMEOUT", DEFAULT_TIMEOUT_S)
    device = _device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL's own watchdog aborts the process at its timeout, naming no one: it gets a margin
    # so that health's diagnosis (at `timeout`, see llama/parallel/health.py) comes first.
    margin = NCCL_WATCHDOG_MARGIN_S if backend == "nccl" else 0.0
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout + margin))
    # Workers idle here between requests for as long as a user reads: no short timeout.
    control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    prefix = f"llama_tp/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    health = Health(rank, world, host, port, prefix=prefix,
                    timeout_s=heartbeat_timeout_s
                    or _env_float("LLAMA_TP_HEARTBEAT", DEFAULT_HEARTBEAT_TIMEOUT_S),
                    exit_on_failure=exit_on_failure, collective_timeout_s=timeout)
    health.start()
    if rank == 0:
        _leader_signals(health)
    return TPContext(rank, world, device, dist.group.WORLD, control, health)


def _leader_signals(health: Health) -> None:
    """Rank 0: Ctrl-C means the workers are expected to go (no failure report); SIGTERM (how
    torchrun stops the run once a rank failed) names a failed rank, then exits (status 1;
    128 + 15 when no rank failed) without waiting for threads stuck in collectives."""
    if threading.current_thread() is not threading.main_thread():
        return
    on_interrupt = signal.getsignal(signal.SIGINT)

    def interrupted(signum: int, frame: object) -> None:
        health.leaving = True
        if callable(on_interrupt):
            on_interrupt(signum, frame)
        if on_interrupt != signal.SIG_IGN:
            raise KeyboardInterrupt

    def terminated(signum: int, frame: object) -> None:
        failure = health.verdict_now()
        if failure is None:
            print("[llama.parallel] rank 0: stopping on SIGTERM", file=sys.stderr, flush=True)
            health.abort("rank 0 was stopped (SIGTERM)")
        health.linger()
        os._exit(1 if failure is not None else 128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, terminated)


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def load_parallel(path: str | Path, ctx: TPContext = SINGLE, *, dtype: torch.dtype | None = None,
                  max_seq_len: int | None = None, tokenizer: str | Path | None = None,
                  load_in_8bit: bool = False, progress: bool = False) -> LoadedModel:
    """Load this rank's slice of the checkpoint at `path` (any format llama.checkpoints
    knows) as a ParallelTransformer on ctx.device. Every rank calls it.

    dtype: default bf16 on CUDA, fp32 on CPU. load_in_8bit: the block Linears (local slices)
    become bitsandbytes Linear8bitLt. Raises ShardingError when the model cannot be split
    over ctx.world_size ranks, CheckpointError for bad files, RankFailure (rank 0) when a
    worker failed to load.
    """
    path = Path(path)
    if ctx.health is not None:
        ctx.health.phase = "loading"
    try:
        loaded = _load(path, ctx, dtype, max_seq_len, tokenizer, load_in_8bit, progress)
    except Exception as exc:
        if ctx.health is not None:
            ctx.health.record_error(exc)
        raise
    _loaded_barrier(ctx)
    return loaded


def _load(path: Path, ctx: TPContext, dtype: torch.dtype | None, max_seq_len: int | None,
          tokenizer: str | Path | None, load_in_8bit: bool, progress: bool) -> LoadedModel:
    from llama.checkpoints import detect

    tok = tokenizer_path(path, detect(path), tokenizer)
    source = open_sliced(path, tok)
    args = source.args if max_seq_len is None else source.args.replace(max_seq_len=max_seq_len)
    check_vocab(args, tok, path)
    plan = ShardPlan(args, ctx.rank, ctx.world_size)  # ShardingError before any reading
    dtype = dtype or default_dtype(ctx.device, load_in_8bit)
    with torch.device("meta"):
        model = ParallelTransformer(args, ctx)
    quantise = None
    if load_in_8bit:
        from llama.quant import make_quantiser

        quantise = make_quantiser(ctx.device)
    count = len(list(model.parameters()))
    stream = progress_bar(source.tensors(plan), count, f"rank {ctx.rank}: loading {path.name}",
                          progress and ctx.is_leader)
    bind(model, stream, path, ctx.device, dtype, quantise)
    seal_row_parallel(model)
    finish(model, ctx.device)
    return LoadedModel(model, tok, source.fmt, path, dtype, ctx.device, load_in_8bit)


def _loaded_barrier(ctx: TPContext) -> None:
    """Wait until every rank has loaded (a slow disk may take minutes: no collective timeout
    applies); rank 0 raises RankFailure naming a rank that failed instead."""
    if ctx.distributed:
        ctx.health.wait_for_all("loaded")
        ctx.health.phase = "idle"


def run_worker_loop(model: ParallelTransformer) -> None:
    """Ranks > 0: replay rank 0's calls on `model` until it sends STOP (then return).

    Raises RankFailure when rank 0 went away; any other exception is published for rank 0's
    report first. SIGINT/SIGTERM end the process at once, saying so first (rank 0 then does
    not blame this rank when torchrun stops every rank).
    """
    ctx = model.tp
    if ctx.is_leader or not ctx.distributed:
        raise DistributedError("run_worker_loop is for ranks > 0 of a multi-process run")
    health = ctx.health
    if threading.current_thread() is threading.main_thread():
        health.exit_on_signals()
    with torch.inference_mode():
        while True:
            health.phase = "idle"
            try:
                cmd = model.channel.receive()
            except Exception as exc:
                raise _worker_failed(ctx, exc) from None
            if cmd.op == Op.STOP:
                return
            health.phase = f"{cmd.op.name.lower()} #{cmd.seq}"
            try:
                model.execute(cmd)
            except Exception as exc:
                raise _worker_failed(ctx, exc) from None


def _worker_failed(ctx: TPContext, exc: Exception) -> Exception:
    """Publish why this worker stops. A lost peer is only a symptom: give rank 0 (which
    names the culprit and sets `abort`, upon which the health thread exits this process)
    a bounded time to decide before giving up on our own."""
    health = ctx.health
    health.record_error(exc)
    if not is_comm_error(exc):
        return exc
    time.sleep(health.timeout_s + 4 * health.interval_s)
    return RankFailure(None, ctx.world_size, f"lost contact with the other ranks ({exc})")


def stop_workers(model: ParallelTransformer) -> None:
    """Rank 0: end the workers' run_worker_loop for `model` (the groups stay up)."""
    if model.tp.distributed and model.tp.is_leader:
        model._lead("stop", lambda: model.channel.send(Op.STOP))


def shutdown(ctx: TPContext, model: ParallelTransformer | None = None) -> None:
    """Leave the run cleanly: rank 0 stops the workers' loop (when `model` is given), every
    rank waits for the others, then the groups are destroyed. After a failure it only tears
    down locally (the peers are gone or exiting)."""
    if not ctx.distributed:
        return
    health = ctx.health
    try:
        if ctx.is_leader and health.failure is None and health.gone_peers():
            # Ctrl-C under torchrun reached the workers too: nobody is left to release.
            health.leaving = True
            health.abort("rank 0 is leaving")
        elif health.failure is None and not health.errored:
            if model is not None and ctx.is_leader:
                stop_workers(model)
            health.stop()  # peers stop beating now: no watchdog may fire from here on
            wait = timedelta(seconds=health.timeout_s)
            dist.monitored_barrier(group=ctx.control, timeout=wait, wait_all_ranks=True)
    except Exception:
        pass  # a peer already left or hangs; nothing more to coordinate
    finally:
        if health.failure is not None and ctx.is_leader:
            health.linger()
        health.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class KVBytes:
    """KV-cache bytes: on one rank (each holds the same) and over all ranks."""

    per_rank: int
    total: int
    world_size: int


def kv_cache_bytes(model: torch.nn.Module, positions: int | None = None) -> KVBytes:
    """KV-cache bytes of `model` for `positions` filled positions (default: capacity).

    Works for a plain Transformer too (world size 1). With KV heads replicated (more ranks
    than KV heads) `total` counts the copies: it is the memory really used."""
    per_rank = sum(c.nbytes(positions) for c in model.caches())
    world = model.tp.world_size if isinstance(model, ParallelTransformer) else 1
    return KVBytes(per_rank, per_rank * world, world)


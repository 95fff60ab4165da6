"""`torchrun --nproc-per-node N -m llama.parallel --model PATH`: check a multi-GPU setup.

Loads the checkpoint split over the ranks, greedy-decodes a few tokens and prints from rank 0
what each rank holds (parameter and KV-cache bytes), the token ids and the decode speed, so a
cluster can be checked before the playground is started on it. Exit status 2 for bad flags or
files (one "error: ..." line), 1 when a rank fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m llama.parallel",
                                description="Load a model split over N ranks and decode.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory or .bin")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--prompt-ids", default="1", help="comma-separated token ids (default: BOS)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to decode")
    return p.parse_args(argv)


def _prompt(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids: expected comma-separated ints, found {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids: expected at least one id")
    return ids


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Prefill `prompt`, decode `n` greedy tokens; -> (new ids, decode seconds)."""
    dev = model.tok_embeddings.weight.device
    model.setup_caches(1)
    logits = model(torch.tensor([prompt], device=dev), input_pos=torch.arange(len(prompt)),
                   last_only=True)
    out = [int(logits[0, -1].argmax())]
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n - 1):
        logits = model(torch.tensor([[out[-1]]], device=dev), input_pos=torch.tensor([pos]))
        out.append(int(logits[0, -1].argmax()))
    return out, time.perf_counter() - t0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    from llama.checkpoints import CheckpointError
    from llama.config import ConfigError
    from llama.parallel.runtime import (
        RankFailure,
        ShardingError,
        init_from_env,
        kv_cache_bytes,
        load_parallel,
        run_worker_loop,
        shutdown,
    )

    ns = parse_args(argv)
    ctx = init_from_env()
    dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
    try:
        prompt = _prompt(ns.prompt_ids)
        loaded = load_parallel(ns.model, ctx, dtype=dtype, max_seq_len=ns.max_seq_len,
                               tokenizer=ns.tokenizer, load_in_8bit=ns.load_in_8bit,
                               progress=sys.stderr.isatty())
    except (CheckpointError, ConfigError, ShardingError, ValueError, FileNotFoundError) as exc:
        if ctx.is_leader:
            print(f"error: {exc}", file=sys.stderr)
        shutdown(ctx)
        return 2
    model = loaded.model
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    every = [held] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(every, held, group=ctx.control)
    try:
        if not ctx.is_leader:
            run_worker_loop(model)
            return 0
        try:
            ids, seconds = greedy(model, prompt, ns.tokens)
        except RankFailure as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        kv = kv_cache_bytes(model, positions=len(prompt) + len(ids))
        print(f"{loaded.path} ({loaded.format}) on {ctx.world_size} rank(s), {loaded.dtype}, "
              f"{loaded.device.type}")
        for rank, b in enumerate(every):
            print(f"rank {rank}: parameters {_size(b)}")
        print(f"KV cache for {len(prompt) + len(ids)} positions: {_size(kv.per_rank)} per rank, "
              f"{_size(kv.total)} in all")
        print("greedy ids: " + ",".join(map(str, ids)))
        rate = (len(ids) - 1) / seconds if seconds > 0 else float("inf")
        print(f"decode: {rate:.1f} tokens/s")
        return 0
    finally:
        shutdown(ctx, model)

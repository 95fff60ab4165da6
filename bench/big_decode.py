"""A 7B-shape model on this machine: ours in 16-bit and in weight-only int8, one at a time.

    python bench/big_decode.py [--preset llama2-7b] [--weights bf16,int8] [--new-tokens 16]

The peers of bench/decode.py need two copies of the weights at once (ours and theirs), which a
7B model does not fit in 24 GB; this runs ours alone. Random weights of the preset's shape are
written once in bf16 by transformers' save_pretrained (13.5 GB for Llama-2-7B, reused when the
shape matches), then each precision is loaded in its own process (a clean peak RSS) by
`llama.checkpoints.load(weights=...)` and timed as bench/decode.py times ours: one warm-up
round, then --rounds timed rounds of prefill, TTFT and greedy decode through
`llama.generate.generate`. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import decode_runs as runs
from bench.common import (
    bench_presets,
    load_average,
    machine_line,
    median,
    mem_available_bytes,
    peak_rss_mb,
    today,
)

HEADER = (
    "| preset | weights | load s | resident MiB | peak RSS MiB | prefill tok/s | "
    "decode tok/s | TTFT ms |\n|---|---|---|---|---|---|---|---|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-7b", choices=sorted(bench_presets()))
    p.add_argument("--weights", default="bf16,int8", help="comma-separated: fp32, bf16, int8")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--ttft-prompt", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llama-bench"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure this precision only
    a = p.parse_args(argv)
    a.load_in_8bit, a.no_fuse = False, False  # what decode_runs.Ours reads
    return a


def measure(a: argparse.Namespace, ckpt: Path, weights: str) -> dict[str, float]:
    """In this process: load `weights`, warm up, time a.rounds rounds."""
    from llama.runtime_opts import configure_threads

    configure_threads(a.threads)
    preset = bench_presets()[a.preset]
    t0 = time.perf_counter()
    ours = runs.Ours(ckpt, preset, torch.device("cpu"), torch.float32, a, weights=weights)
    load_s = time.perf_counter() - t0  # load + one warm-up round
    prompt = runs.prompt_ids(preset.args.vocab_size, a.prompt_len)
    for _ in range(a.rounds):
        ours.round(prompt, prompt[: a.ttft_prompt], a.new_tokens, record=True)
    return {
        "load_and_warmup_s": load_s,
        "resident_mb": ours.resident_mb,
        "peak_rss_mb": peak_rss_mb(),
        "prefill": median(ours.prefill),
        "decode": median(ours.decode),
        "ttft_ms": median(ours.ttft) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    preset = bench_presets()[a.preset]
    ckpt = a.workdir / f"{preset.name}-bf16"
    if a.one:
        print("RESULT " + json.dumps(measure(a, ckpt, a.one)), flush=True)
        return 0
    print(machine_line(torch.device("cpu")), flush=True)
    need = preset.args.n_params() * 2 * 1.1
    if need > mem_available_bytes():
        print(
            f"skipped: needs ~{need / 2**30:.1f} GiB, MemAvailable "
            f"{mem_available_bytes() / 2**30:.1f} GiB"
        )
        return 0
    started, before = today(), load_average()
    runs.write_hf_checkpoint(preset.args, ckpt, torch.bfloat16)
    rows = []
    for weights in a.weights.split(","):
        child = [sys.executable, __file__, *(argv or sys.argv[1:]), "--one", weights]
        out = subprocess.run(child, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{weights}: failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"  {weights}: {r}", flush=True)
        rows.append(
            f"| {preset.name} | {weights} | {r['load_and_warmup_s']:.0f} | "
            f"{r['resident_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['prefill']:.1f} | "
            f"{r['decode']:.2f} | {r['ttft_ms']:.0f} |"
        )
    print(
        f"\n`python bench/big_decode.py {' '.join(argv or sys.argv[1:])}` ({started}, "
        f"load average {before} / {load_average()}); prompt {a.prompt_len} random tokens, "
        f"{a.new_tokens} new tokens, {a.rounds} timed round(s) after a warm-up; load s "
        "includes the warm-up round.\n"
    )
    print("\n".join([HEADER, *rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Our runtime against Hugging Face transformers on the same random weights, side by side.

For each preset: write one random checkpoint in the HF layout (transformers' own
save_pretrained; the smollm2 preset is a real GGUF file instead, read by transformers with
from_pretrained(dir, gguf_file=...): the same dequantised weights on both sides), load it
with `llama.checkpoints.load` (then `fuse_projections`) and with transformers'
LlamaForCausalLM, and measure both in this process, interleaved round by round
(ABBA order), on the same thread count:

- prefill tokens/s: one forward over a 128-token prompt into an empty KV cache;
- decode tokens/s: greedy, 128 new tokens with the KV cache, counted after the first token.
  Ours is the product's loop, `llama.generate.generate` (temperature 0, n_top=0, EOS
  ignored); theirs is `model.generate(do_sample=False, min_new_tokens=...)` with the default
  dynamic cache and with the static cache, the better one reported;
- time to first token (generate call to first token, 128- and 100-token prompts);
- peak RSS added by loading and running each runtime (VmHWM window);
- decode bytes/s (weights + KV cache read per token x tokens/s) against the memory
  bandwidth measured by bench/membw.py on the same threads, before and after.

Medians over rounds with (min-max); the machine may be shared, so the spread is printed.

    python bench/decode.py                       # all presets that fit, print the table
    python bench/decode.py --write-results       # ... and rewrite bench/RESULTS.md
    python bench/decode.py --preset shipped --rounds 7
    python bench/decode.py --device cuda --dtype bf16 --compile --preset llama2-7b
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import decode_report as report
from bench import decode_runs as runs
from bench import ops as bench_ops
from bench.common import (
    BenchPreset,
    bench_presets,
    load_average,
    machine_line,
    mem_available_bytes,
    today,
)
from bench.membw import measure
from llama.checkpoints import default_dtype
from llama.runtime_opts import physical_cores, recommended_threads

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        action="append",
        choices=list(bench_presets()),
        help="repeatable; default: all that fit in memory",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also ours with llama.runtime_opts.compile_decode (an extra row per preset)",
    )
    p.add_argument(
        "--compile-max-params",
        type=float,
        default=1e8,
        help="on CPU, compile only presets below this many parameters (memory-bound "
        "decodes gain little; compiling them takes minutes)",
    )
    p.add_argument("--load-in-8bit", action="store_true", help="both: bitsandbytes LLM.int8")
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="ours as the file has it (load(fuse=False): no fused projections, no output layout)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="'auto' (llama.runtime_opts.recommended_threads: physical cores, at most 2 for "
        "models under 10M parameters on CPU), or a number; the same for both runtimes",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument(
        "--heavy-rounds",
        type=int,
        default=2,
        help="rounds for presets over 500M parameters (minutes per round on a CPU)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ttft-prompt", type=int, default=100)
    p.add_argument("--skip-hf-static", action="store_true", help="only HF's dynamic cache")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/llama-bench"),
        help="random checkpoints are written (and reused) here",
    )
    p.add_argument("--write-results", action="store_true", help=f"rewrite {RESULTS.name}")
    return p.parse_args(argv)


def threads_for(a: argparse.Namespace, preset: BenchPreset, device: torch.device) -> int:
    if a.threads != "auto":
        return int(a.threads)
    return recommended_threads(preset.args.n_params(), device)


def fits(
    preset: BenchPreset, dtype: torch.dtype, device: torch.device, variants: list[bool]
) -> str | None:
    """None when both runtimes fit at once, else the reason to skip."""
    item = torch.finfo(dtype).bits // 8
    need = preset.args.n_params() * item
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have, what = free, "free GPU memory"
    else:
        have, what = mem_available_bytes(), "MemAvailable"
    # Every runtime resident at once, plus one more copy while the checkpoint is written.
    copies = len(variants) + 1.3
    if copies * need > have:
        return (
            f"needs ~{copies * need / 2**30:.1f} GiB for {copies:g} copies of "
            f"{need / 2**30:.1f} GiB of weights; {what} is {have / 2**30:.1f} GiB"
        )
    return None


def ours_variants(a: argparse.Namespace, preset: BenchPreset, device: torch.device) -> list[bool]:
    """[False] (eager), plus True (compiled) when --compile applies to this preset."""
    small = preset.args.n_params() < a.compile_max_params
    return [False, True] if a.compile and (device.type == "cuda" or small) else [False]


def run_preset(
    a: argparse.Namespace, preset: BenchPreset, device: torch.device, dtype: torch.dtype
) -> list[dict[str, object]]:
    threads = threads_for(a, preset, device)
    torch.set_num_threads(threads)
    print(
        f"\n== {preset.name} ({preset.note}, {preset.args.n_params() / 1e6:.1f}M params, "
        f"{threads} thread(s))",
        flush=True,
    )
    ckpt = preset.gguf or runs.write_hf_checkpoint(
        preset.args, a.workdir / f"{preset.name}-{a.dtype_name}", dtype
    )
    ours = [
        runs.Ours(ckpt, preset, device, dtype, a, compiled)
        for compiled in ours_variants(a, preset, device)
    ]
    theirs = runs.Theirs(ckpt, preset, device, dtype, a)
    everyone = [*ours, theirs]
    prompt = runs.prompt_ids(preset.args.vocab_size, a.prompt_len)
    short = prompt[: a.ttft_prompt]
    bw_before = measure(threads, device=str(device))
    rounds = a.heavy_rounds if preset.args.n_params() > 5e8 else a.rounds
    for r in range(1, rounds + 1):  # each runtime warmed up (and compiled) when loaded
        for runner in everyone if r % 2 else reversed(everyone):
            runner.round(prompt, short, a.new_tokens, record=True)
        print(f"  round {r}: " + " | ".join(x.summary() for x in everyone), flush=True)
    bw_after = measure(threads, device=str(device))
    return [report.row(preset, threads, o, theirs, bw_before, bw_after, a) for o in ours]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype(device)
    a.dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    presets = bench_presets()
    names = a.preset or list(presets)
    started, load_before = today(), load_average()
    bw = measure(physical_cores(), device=str(device))
    print(
        f"{machine_line(device)}\nmemory bandwidth ({physical_cores()} threads): "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()),
        flush=True,
    )
    # The per-op table first: measured after the big presets, in a process that has held
    # gigabytes of weights, its two-thread figures came out slower than one thread's.
    ops = ""
    if a.write_results and device.type == "cpu":
        ops = bench_ops.markdown(bench_ops.run(20, verbose=False))
    rows, skipped = [], []
    for name in names:
        reason = fits(presets[name], dtype, device, ours_variants(a, presets[name], device))
        if reason:
            print(f"\n== {name}: skipped: {reason}", flush=True)
            skipped.append((name, reason))
            continue
        t0 = time.perf_counter()
        rows.extend(run_preset(a, presets[name], device, dtype))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = report.table(rows)
    print("\n" + table)
    if a.write_results:
        ctx = dict(
            a=a,
            argv=argv if argv is not None else sys.argv[1:],
            started=started,
            machine=machine_line(device),
            load_before=load_before,
            load_after=load_average(),
            bw=bw,
            skipped=skipped,
            ops=ops,
        )
        old = RESULTS.read_text() if RESULTS.is_file() else ""
        decode_md = report.results_markdown(table, rows, ctx)
        RESULTS.write_text(report.replace_decode_section(old, decode_md))
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

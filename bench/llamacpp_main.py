"""`bench/decode.py --peer llamacpp`: run bench/llamacpp.py's pairs preset by preset."""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench import decode_runs as runs
from bench import llamacpp, llamacpp_report
from bench.common import (
    LLAMA2_TOKENIZER,
    BenchPreset,
    bench_presets,
    load_average,
    machine_line,
    mem_available_bytes,
    today,
)
from bench.decode_runs import Runtime
from llama.runtime_opts import recommended_threads

DEFAULT_PRESETS = ("shipped", "stories15M", "tinyllama-1.1b", "smollm2")
# bytes per parameter resident at once per precision, ours + llama.cpp (llama.cpp maps its
# files: page cache the kernel can drop, hence a small margin)
BYTES_PER_PARAM = {"fp32": 4 + 4, "bf16": 2 + 2, "int8": 1 + 1.1}


def skip_reason(preset: BenchPreset, precisions: str) -> str | None:
    if preset.tokenizer == LLAMA2_TOKENIZER and not LLAMA2_TOKENIZER.is_file():
        return (
            f"needs the Llama-2 tokenizer at {LLAMA2_TOKENIZER} (../shared/data, beside "
            "the repo), absent here"
        )
    per_param = sum(BYTES_PER_PARAM[w] for w in precisions.split(","))
    need = preset.args.n_params() * per_param * 1.05
    if need > mem_available_bytes():
        return (
            f"needs ~{need / 2**30:.1f} GiB for the six runtimes at once; MemAvailable is "
            f"{mem_available_bytes() / 2**30:.1f} GiB"
        )
    return None


def run_preset(a: argparse.Namespace, preset: BenchPreset) -> list[tuple[str, Runtime, Runtime]]:
    threads = (
        int(a.threads)
        if a.threads != "auto"
        else recommended_threads(preset.args.n_params(), "cpu")
    )
    torch.set_num_threads(threads)
    print(
        f"\n== {preset.name} ({preset.note}, {preset.args.n_params() / 1e6:.1f}M params, "
        f"{threads} thread(s))",
        flush=True,
    )
    ckpt = preset.gguf or runs.write_hf_checkpoint(preset.args, a.workdir / f"{preset.name}-fp32")
    pairs = llamacpp.runners(ckpt, preset, threads, a)
    everyone = list(dict.fromkeys(rt for pair in pairs for rt in pair))  # a peer once
    prompt = runs.prompt_ids(preset.args.vocab_size, a.prompt_len)
    short = prompt[: a.ttft_prompt]
    rounds = a.heavy_rounds if preset.args.n_params() > 5e8 else a.rounds
    for r in range(1, rounds + 1):
        for runner in everyone if r % 2 else reversed(everyone):
            runner.round(prompt, short, a.new_tokens, record=True)
        print(
            f"  round {r} ({load_average()}): "
            + " | ".join(f"{x.name} {x.decode[-1]:.1f}" for x in everyone),
            flush=True,
        )
    return [(preset.name, o, t) for o, t in pairs]


def main(a: argparse.Namespace, argv: list[str]) -> int:
    hint = llamacpp.available()
    if hint:
        print(hint)
        return 0
    import llama_cpp

    presets = bench_presets()
    started, load_before = today(), load_average()
    print(machine_line(torch.device("cpu")), flush=True)
    results, skipped = [], []
    for name in a.preset or [n for n in DEFAULT_PRESETS if n in presets]:
        reason = skip_reason(presets[name], a.precisions)
        if reason:
            print(f"\n== {name}: skipped: {reason}", flush=True)
            skipped.append((name, reason))
            continue
        t0 = time.perf_counter()
        results += run_preset(a, presets[name])
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for _, o, t in results:  # keep the figures, free the weights
            o.model = None
            t.llm = None
        gc.collect()
    print("\n" + llamacpp_report.table(results))
    print("\n" + llamacpp_report.targets(results))
    if a.write_results:
        from bench.decode import RESULTS

        ctx = dict(
            cmd="python bench/decode.py " + " ".join(argv),
            started=started,
            machine=machine_line(torch.device("cpu")),
            load_before=load_before,
            load_after=load_average(),
            skipped=skipped,
            rounds=a.rounds,
            prompt_len=a.prompt_len,
            new_tokens=a.new_tokens,
            version=llama_cpp.__version__,
        )
        old = RESULTS.read_text() if RESULTS.is_file() else ""
        RESULTS.write_text(
            llamacpp_report.replace_section(old, llamacpp_report.section(results, ctx))
        )
        print(f"wrote {RESULTS}")
    return 0

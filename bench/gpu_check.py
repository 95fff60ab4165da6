"""One-shot GPU check: the CUDA tests and decode/prefill throughput of a 7B-shape model, as one
table to paste into bench/RESULTS.md. Run `bash bench/gpu_check.sh` on a bare CUDA machine
(it installs what is missing, then runs this); under 8 minutes on one recent GPU.

Rows: each test of tests/test_cuda.py (pytest -m cuda); then a random LLaMA-2 7B-shape model
(dim 4096, 32 layers, vocab 32000; context 512) in bf16 (fp16 without native bf16): ours eager,
ours compiled (compile_decode: CUDA graphs, one per cache span), ours 8-bit (fp16
activations), and transformers' LlamaForCausalLM in the same dtype. Each row gives decode
and prefill tokens/s, the fraction of the HBM bound (decode reads every weight and the cache
once per token: tok/s x bytes per token / the copy bandwidth measured here), peak allocated
GPU memory, and for the compiled row the dynamo graph count before and after decoding.

Without a CUDA GPU it says so and exits 0, having measured nothing. --smoke runs the
measuring code on the CPU with a tiny shape (to check this script; not GPU figures).
"""

from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO
from bench.decode_runs import hf_config, prompt_ids
from bench.membw import bandwidth, best_seconds, measure
from llama.checkpoints import default_dtype
from llama.config import ModelArgs
from llama.generate import host_positions
from llama.model import Transformer
from llama.quant import weight_bytes

BUDGET_S = 7.5 * 60  # rows not started by then are reported as skipped
TESTS_BUDGET_S = 4 * 60  # the CUDA tests (one compile of the shipped model included)
SHAPE_7B = ModelArgs(
    dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=512
)
SHAPE_SMOKE = ModelArgs(
    dim=128, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=512
)
GiB = 2**30
Row = dict[str, str]
COLUMNS = (
    "check",
    "result",
    "decode tok/s",
    "prefill tok/s",
    "HBM bound",
    "peak GiB",
    "graphs",
    "notes",
)


def no_gpu_reason() -> str | None:
    """Why there is no CUDA GPU to check, or None when there is one."""
    if torch.cuda.is_available():
        return None
    built = torch.version.cuda
    return "torch.cuda.is_available() is False " + (
        f"(torch {torch.__version__} built for CUDA {built}: no device or driver)"
        if built
        else f"(torch {torch.__version__} is a CPU-only build)"
    )


# Tests ---------------------------------------------------------------------------------------
def run_tests(deadline: float) -> list[Row]:
    """tests/test_cuda.py through pytest (-m cuda -v), one row per test as pytest reports it;
    tests not reached by `deadline` get one TIMEOUT row (the rows before it are kept)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-rs",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "tests/test_cuda.py",
    ]
    timeout = max(30.0, deadline - time.monotonic())
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=REPO, timeout=timeout, capture_output=True, text=True, check=False
        )
        out, timed_out = res.stdout, False
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        out, timed_out = raw.decode(errors="replace") if isinstance(raw, bytes) else raw, True
    rows = [_test_row(m) for m in TEST_LINE.finditer(out)]
    reasons = dict(SKIP_LINE.findall(out))
    for r in rows:
        if r["result"] == "skip":
            r["notes"] = "; ".join(sorted(set(reasons.values())))
    if timed_out:
        rows.append(row("tests/test_cuda.py", "TIMEOUT", notes=f"stopped after {timeout:.0f} s"))
    elif not rows:
        rows.append(row("tests/test_cuda.py", "ERROR", notes=out.strip()[-200:]))
    rows.append(
        row(
            "tests: total",
            "ok" if not timed_out else "TIMEOUT",
            notes=f"{time.monotonic() - t0:.0f} s",
        )
    )
    return rows


TEST_LINE = re.compile(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", re.M)
SKIP_LINE = re.compile(r"^SKIPPED \[\d+\] (tests/test_cuda\.py:\d+): (.*)$", re.M)


def _test_row(m: re.Match[str]) -> Row:
    result = {"PASSED": "pass", "FAILED": "FAIL", "SKIPPED": "skip", "ERROR": "ERROR"}[m[2]]
    return row(f"test {m[1]}", result)


# Models ----------------------------------------------------------------------------------------
def random_ours(
    args: ModelArgs, device: torch.device, dtype: torch.dtype, fuse: bool = True
) -> Transformer:
    """Our model with random weights made on `device`, fused on the meta device first as the
    loader fuses before the copy (8-bit models stay unfused, as the loader leaves them)."""
    with torch.device("meta"):
        model = Transformer(args)
    if fuse:
        model.fuse_projections()
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def random_theirs(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    with torch.device(device):
        return LlamaForCausalLM._from_config(hf_config(args), dtype=dtype).eval()


# Measurements ----------------------------------------------------------------------------------
@torch.inference_mode()
def ours_rates(model: Transformer, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) the way generate() drives the model: host positions,
    one transfer per token."""
    device = model.tok_embeddings.weight.device
    positions = host_positions(model.args.max_seq_len, device)
    tokens = torch.tensor([prompt], device=device)
    prefill = best_seconds(
        lambda: model(tokens, positions[: len(prompt)], last_only=True), 3, device
    )

    def decode() -> None:
        logits = model(tokens, positions[: len(prompt)], last_only=True)
        token = logits[0, -1].argmax().view(1, 1)
        for i in range(n):
            pos = len(prompt) + i
            logits = model(token, positions[pos : pos + 1], last_only=True)
            token = logits[0, -1].argmax().view(1, 1)
            token.tolist()

    both = best_seconds(decode, 2, device)
    return len(prompt) / prefill, n / max(both - prefill, 1e-9)


@torch.inference_mode()
def theirs_rates(model: Any, prompt: list[int], n: int) -> tuple[float, float]:
    device = next(model.parameters()).device
    x = torch.tensor([prompt], device=device)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    prefill = best_seconds(lambda: model(x, use_cache=False), 3, device)
    one = best_seconds(
        lambda: model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw), 2, device
    )
    full = best_seconds(
        lambda: model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw), 2, device
    )
    return len(prompt) / prefill, (n - 1) / max(full - one, 1e-9)


def rate_row(
    name: str,
    rates: tuple[float, float],
    bytes_per_token: int,
    bw_gbs: float,
    device: torch.device,
    graphs: str = "",
    notes: str = "",
) -> Row:
    prefill, decode = rates
    bound = decode * bytes_per_token / (bw_gbs * 1e9)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0
    return row(
        name,
        "ok",
        f"{decode:.1f}",
        f"{prefill:.0f}",
        f"{bound:.0%}",
        f"{peak:.2f}" if device.type == "cuda" else "n/a",
        graphs,
        notes,
    )


def row(
    check: str,
    result: str,
    decode: str = "",
    prefill: str = "",
    bound: str = "",
    peak: str = "",
    graphs: str = "",
    notes: str = "",
) -> Row:
    return dict(
        zip(COLUMNS, (check, result, decode, prefill, bound, peak, graphs, notes), strict=True)
    )


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_rows(
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    prompt_len: int,
    n: int,
    deadline: float,
) -> list[Row]:
    """Our eager, compiled and 8-bit rows and transformers', each on a freshly made model."""
    from torch._dynamo.utils import counters

    from llama.runtime_opts import compile_decode

    bw = bandwidth(measure(mib=1024 if device.type == "cuda" else 64, device=str(device)))
    prompt = prompt_ids(args.vocab_size, prompt_len)
    kv = 2 * args.n_layers * args.kv_heads * args.head_dim * (prompt_len + n // 2)
    label = str(dtype).removeprefix("torch.")
    rows = [row("copy bandwidth", "ok", notes=f"{bw:.0f} GB/s (the HBM bound's denominator)")]

    def eager() -> Row:
        model = random_ours(args, device, dtype)
        model.setup_caches(1)
        nbytes = weight_bytes(model) + kv * dtype.itemsize
        return rate_row(f"ours {label} eager", ours_rates(model, prompt, n), nbytes, bw, device)

    def compiled() -> Row:
        model = random_ours(args, device, dtype)
        model.setup_caches(1)
        torch._dynamo.reset()
        counters.clear()
        t0 = time.perf_counter()
        step = compile_decode(model)
        warm, compile_s = counters["stats"]["unique_graphs"], time.perf_counter() - t0
        rates = ours_rates(model, prompt, n)
        after = counters["stats"]["unique_graphs"]
        kept = "kept" if after == warm == len(step.spans) else "CHANGED"
        nbytes = weight_bytes(model) + kv * dtype.itemsize
        return rate_row(
            f"ours {label} compiled",
            rates,
            nbytes,
            bw,
            device,
            f"{warm} -> {after} ({kept}; spans {step.spans})",
            f"compiled in {compile_s:.0f} s",
        )

    def eight_bit() -> Row:
        from llama.quant import quantise_model

        model = quantise_model(random_ours(args, device, torch.float16, fuse=False))
        model.setup_caches(1)
        nbytes = weight_bytes(model) + kv * 2
        return rate_row(
            "ours 8-bit (fp16 activations)", ours_rates(model, prompt, n), nbytes, bw, device
        )

    def theirs() -> Row:
        model = random_theirs(args, device, dtype)
        nbytes = weight_bytes(model) + kv * dtype.itemsize
        return rate_row(f"transformers {label}", theirs_rates(model, prompt, n), nbytes, bw, device)

    for name, make in (  # compiled last: its compile takes longest
        ("ours eager", eager),
        ("ours 8-bit", eight_bit),
        ("transformers", theirs),
        ("ours compiled", compiled),
    ):
        if time.monotonic() > deadline:
            rows.append(row(name, "skip", notes="past the time budget"))
            continue
        fresh(device)
        try:
            rows.append(make())
        except Exception as exc:  # one broken row must not hide the others
            rows.append(row(name, "ERROR", notes=f"{type(exc).__name__}: {str(exc)[:100]}"))
        fresh(device)
    return rows


# Output ----------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU smoke run, torch {torch.__version__}: NOT GPU figures"
    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name}, {p.total_memory / GiB:.0f} GiB, sm_{p.major}{p.minor}, torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run the measuring code on the CPU with a tiny shape (checks the script)",
    )
    p.add_argument("--skip-tests", action="store_true", help="only the throughput rows")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None and not a.smoke:
        print(f"gpu_check: no CUDA GPU on this machine: {reason}. Nothing was run or measured.")
        return 0
    start = time.monotonic()
    deadline = start + BUDGET_S
    device = torch.device("cpu" if a.smoke else "cuda")
    args = SHAPE_SMOKE if a.smoke else SHAPE_7B
    dtype = default_dtype(device) if device.type == "cuda" else torch.float32
    rows = [] if a.skip_tests or a.smoke else run_tests(start + TESTS_BUDGET_S)
    rows += bench_rows(args, device, dtype, a.prompt_len, a.new_tokens, deadline)
    shape = f"dim {args.dim} x {args.n_layers} layers, vocab {args.vocab_size}"
    print(
        f"\nGPU check: {machine(device)}; {shape}, context {args.max_seq_len}, prompt "
        f"{a.prompt_len}, {a.new_tokens} new tokens; {time.monotonic() - start:.0f} s\n"
    )
    print(table(rows))
    bad = [r for r in rows if r["result"] in ("FAIL", "ERROR", "TIMEOUT")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

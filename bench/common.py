"""Shared helpers for the benchmarks: machine description, memory, timing, bench presets.

Nothing here imports transformers; bench/decode.py does, lazily.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/decode.py` from anywhere
    sys.path.insert(0, str(REPO))

from llama.assets import SHIPPED_MODEL_DIR  # noqa: E402
from llama.config import PRESETS, ModelArgs  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"
TOK512 = SHARED_DATA / "stories260K" / "tok512.model"
SMOLLM2 = SHARED_DATA / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BenchPreset:
    """A model shape to benchmark and the tokenizer whose vocabulary matches it."""

    name: str
    args: ModelArgs
    tokenizer: Path
    note: str
    gguf: Path | None = None  # a real GGUF file both runtimes load, instead of random weights


def bench_presets() -> dict[str, BenchPreset]:
    """The issue's presets. 'shipped' is assets/tinychat's shape when present, else stories260K's.

    Weights are random (written fresh; only the shapes matter for speed), except SmolLM2's:
    both runtimes dequantise the same real GGUF file (when ../shared/data has it).
    """
    shipped = SHIPPED_MODEL_DIR / "params.json"
    if shipped.is_file():
        args = ModelArgs.from_params_json(shipped)
        first = BenchPreset(
            "shipped", args, SHIPPED_MODEL_DIR / "tokenizer.model", "assets/tinychat shape"
        )
    else:
        first = BenchPreset(
            "shipped", PRESETS["stories260K"], TOK512, "stories260K shape (assets/tinychat absent)"
        )
    out = {"shipped": first}
    for name in ("stories15M", "tinyllama-1.1b", "llama2-7b"):
        out[name] = BenchPreset(name, PRESETS[name], LLAMA2_TOKENIZER, f"{name} shape")
    if SMOLLM2.is_file():
        from llama.checkpoints.gguf import model_args

        note = "SmolLM2-135M GGUF Q4_1, dequantised to the bench dtype"
        out["smollm2"] = BenchPreset("smollm2", model_args(SMOLLM2), SMOLLM2, note, SMOLLM2)
    return out


# Machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line(device: torch.device) -> str:
    """One line: CPU model, cores, RAM, GPU when used, torch and transformers versions."""
    from llama.runtime_opts import physical_cores

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"{cpu_model()}, {physical_cores()} physical cores, {ram:.0f} GiB RAM"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "absent"
    parts.append(f"torch {torch.__version__}, transformers {hf}")
    return "; ".join(parts)


def today() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# Memory ----------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Resident set size now (MiB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size since the last `reset_peak_rss` (MiB)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Start a new peak RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# Timing ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: list[float]) -> Iterator[None]:
    """Append the wall-clock seconds of the block (device work included) to `out`."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t0)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """'median (min-max)' for a list of rates."""
    if not xs:
        return "n/a"
    return f"{median(xs):.4g} ({min(xs):.4g}-{max(xs):.4g})"


def interleave(runs: dict[str, Callable[[], None]], rounds: int) -> None:
    """Call every run once per round, reversing the order on odd rounds (ABBA...)."""
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name]()

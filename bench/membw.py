"""Memory bandwidth with torch on the benchmark's thread count: STREAM-style copy and triad.

copy:  a = b           (8 bytes moved per fp32 element: one read, one write)
triad: a = b + s * c   (12 bytes per element: two reads, one write)
read:  sum(b)          (4 bytes per element), what a decode step mostly does

Arrays are 256 MiB each by default, far beyond the last-level cache. Each kernel runs
`repeats` times and the best time counts (STREAM's convention: the machine's capability,
not its noise). The decode benchmark takes max(copy, triad) as "the bandwidth" and also
reports read.

    python bench/membw.py [--threads N] [--mib 256] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

try:
    from bench.common import sync
except ImportError:  # run as a script: bench/ is on sys.path, the repo is not
    from common import sync


def measure(
    threads: int | None = None, mib: int = 256, repeats: int = 7, device: str = "cpu"
) -> dict[str, float]:
    """GB/s (1e9 bytes/s) for copy, triad and read; restores the thread count it found."""
    dev = torch.device(device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        n = mib * 2**20 // 4
        a, b, c = (torch.empty(n, device=dev) for _ in range(3))
        b.fill_(1.0)
        c.fill_(2.0)
        kernels = {
            "copy": (lambda: a.copy_(b), 8),
            "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 12),
            "read": (lambda: b.sum(), 4),
        }
        return {
            name: n * nbytes / best_seconds(fn, repeats, dev) / 1e9
            for name, (fn, nbytes) in kernels.items()
        }
    finally:
        torch.set_num_threads(before)


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall-clock seconds of fn over `repeats` runs after one warm-up."""
    fn()  # first touch / warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth(result: dict[str, float]) -> float:
    """The figure decode is compared with: the better of copy and triad (GB/s)."""
    return max(result["copy"], result["triad"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="default: torch's current")
    p.add_argument("--mib", type=int, default=256, help="size of each array (MiB)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    r = measure(a.threads, a.mib, a.repeats, a.device)
    threads = a.threads or torch.get_num_threads()
    print(f"threads={threads} " + " ".join(f"{k}={v:.1f} GB/s" for k, v in r.items()))


if __name__ == "__main__":
    main()

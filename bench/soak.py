"""Soak the served app through its API (issue 15): 8 sessions x 10 turns at once with every
live view on, then 40 turns in a row in one session.

Checks: every reply arrives and finishes (no stuck session), each session's replies equal the
same dialog replayed alone in this process with the same seeds (no cross-talk), and the
server's RSS grows less than 5% from the end of the concurrent phase (the warm-up) to the end
of the 40 turns. Prints the figures and exits 1 when a check fails.

    python bench/soak.py            # ~10 min on 2 busy cores; too slow for the test suite
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from gradio_client import Client

from llama.sampling import SamplingParams
from tests.app_server import AppServer, model_path, model_template, start_app
from tests.test_gradio_client import message, respond_args, seed, text_of
from ui.outputs import VIEW_LABELS
from ui.runtime import Runtime, load_runtime
from ui.turn import SessionControl, Views, run_turn

SESSIONS, TURNS, SEQUENTIAL, MAX_NEW = 8, 10, 40, 16
GROWTH_LIMIT = 0.05


def turn(client: Client, template: str, text: str, seed_: int) -> tuple[str, str]:
    """One turn with every view on: (reply, status line)."""
    client.predict(text, api_name="/add_message")
    args = respond_args(template, seed_, max_new_tokens=MAX_NEW, views=list(VIEW_LABELS), every=4)
    out = client.submit(*args, api_name="/respond").result(timeout=600)
    return text_of(out[0][-1]), out[5]


def session(server: AppServer, template: str, s: int, turns: int) -> list[tuple[str, str]]:
    client = Client(server.url, verbose=False)
    try:
        return [turn(client, template, message(s, t), seed(s, t)) for t in range(turns)]
    finally:
        client.close()


@functools.cache
def runtime(template: str) -> Runtime:
    return load_runtime(model_path(), template=template, progress=False)


def replay(template: str, s: int, turns: int) -> list[str]:
    """The same dialog alone, in this process, views off (they do not change the tokens)."""
    rt = runtime(template)
    history: list[dict[str, str]] = []
    out = []
    for t in range(turns):
        history.append({"role": "user", "content": message(s, t)})
        params = SamplingParams(temperature=0.9, max_new_tokens=MAX_NEW, seed=seed(s, t))
        views = Views(shown=frozenset())
        *_, last = run_turn(rt, history, params, views, template, "", SessionControl())
        history = last.chat
        out.append(history[-1]["content"])
    return out


def main() -> int:
    template = model_template()
    server = start_app(Path(tempfile.mkdtemp(prefix="soak-")))
    errors: list[str] = []
    try:
        rss_start = server.rss_bytes()
        t0 = time.monotonic()
        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(session, server, template, s, TURNS) for s in range(SESSIONS)]
            results = []
            for s, f in enumerate(futures):
                try:
                    results.append(f.result(timeout=3600))
                except Exception as exc:  # a refused or lost turn is a finding, not a crash
                    errors.append(f"session {s}: {exc}")
                    results.append([])
        concurrent_s = time.monotonic() - t0
        rss_warm = server.rss_bytes()
        sequential = session(server, template, 0, SEQUENTIAL)  # session 0's dialog, longer
        rss_end = server.rss_bytes()
    finally:
        server.stop()
    torch.set_num_threads(1)
    for s, replies in enumerate(results):
        unfinished = [t for t, (_, status) in enumerate(replies) if "finished:" not in status]
        if unfinished:
            errors.append(f"session {s}: turns {unfinished} did not finish")
        if replies and [r for r, _ in replies] != replay(template, s, TURNS):
            errors.append(f"session {s}: replies differ from the same dialog replayed alone")
    if [r for r, _ in sequential] != replay(template, 0, SEQUENTIAL):
        errors.append("the 40-turn session differs from its replay alone")
    growth = rss_end / rss_warm - 1
    if growth >= GROWTH_LIMIT:
        errors.append(f"RSS grew {growth:.1%} over {SEQUENTIAL} turns after warm-up")
    mib = 2**20
    print(
        f"sessions {SESSIONS} x {TURNS} turns at once ({concurrent_s:.0f} s), then "
        f"{SEQUENTIAL} turns in a row; turns {SESSIONS * TURNS + len(sequential)}; "
        f"errors {len(errors)}\nRSS MiB: start {rss_start / mib:.1f}, after warm-up "
        f"{rss_warm / mib:.1f}, end {rss_end / mib:.1f} ({growth:+.1%})"
    )
    for e in errors:
        print("ERROR", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

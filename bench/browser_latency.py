"""What a person sees in the browser: Enter -> first visible reply text, visible text updates per
second, Enter -> last text, and how soon Stop takes effect; views on and off, beside the
server's own TTFT and tokens/s (read from the status line of the same reply).

    python bench/browser_latency.py [--model PATH] [--runs 3] [--max-new-tokens 200]
    python bench/browser_latency.py --server-only [--runs 4]   # the app's path, no browser

Starts `python app.py` (the shipped model unless --model) on a free local port and drives it
with Playwright in Debian's chromium (headless, /usr/bin/chromium). Times are taken inside the
page with its own clock (tests/browser_kit.py's LATENCY_RECORDER): the keydown of Enter, every
change of the reply's visible text, the click on Stop. Prints a markdown table for
bench/RESULTS.md with the machine, the date, the load average and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.app_server import start_app
from tests.browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    STOP_ON_FIRST,
    arm_recorder,
    bot_texts,
    clear_chat,
    open_app,
    recorded,
    send,
    set_number,
    set_views,
    status,
    wait_for,
)

PROMPT = "Tell me a long story about a dog named Max."  # seed 0: 337 tokens (shipped)
STOPPED = r"Stopped|finished:"  # the status line once Stop took effect (ui/stop_freeze.js)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for app.py (default: shipped)")
    p.add_argument("--runs", type=int, default=3, help="replies per setting")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", default="0", help="same seed, same reply in every setting")
    p.add_argument(
        "--server-only",
        action="store_true",
        help="no browser: Handlers.respond in this process, views on and off taking turns, "
        "figures drawn in the app's drawing process; the status line's tok/s",
    )
    return p.parse_args()


def run_server_only(args: argparse.Namespace) -> list[str]:
    """Decode tokens/s of the app's own streaming path with all views on and off."""
    import torch

    from llama.assets import shipped_model_dir
    from ui.handlers import Handlers
    from ui.live import DrawingProcess
    from ui.outputs import ALL_HEADS, VIEW_LABELS
    from ui.runtime import load_runtime
    from ui.settings import SAMPLING_FIELDS, SLIDERS
    from ui.turn import SessionControl

    torch.set_num_threads(1)  # as app.py does for a tiny model
    rt = load_runtime(args.model or shipped_model_dir(), progress=False)
    drawing = DrawingProcess()
    drawing.start()
    h = Handlers(rt, draw_fn=drawing)
    values = {k: SLIDERS[k].default for k in SAMPLING_FIELDS} | {
        "max_new_tokens": args.max_new_tokens
    }
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.runs):
        for on in (True, False):
            control = SessionControl()
            _, history, _ = h.add_message(PROMPT, [], control)
            views = list(VIEW_LABELS) if on else []
            outs = list(
                h.respond(
                    history,
                    control,
                    "",
                    rt.default_template,
                    *[values[k] for k in SAMPLING_FIELDS],
                    args.seed,
                    "",
                    views,
                    0,
                    ALL_HEADS,
                    "heads",
                    8,
                )
            )
            line = next(str(o[6]) for o in outs if "finished:" in str(o[6]))
            rates[on].append(server_figures(line)[1] or 0.0)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    return [
        "| views | decode tok/s (median) | runs |",
        "|---|---|---|",
        f"| all on | {on:.1f} | {', '.join(f'{r:.0f}' for r in rates[True])} |",
        f"| off | {off:.1f} | {', '.join(f'{r:.0f}' for r in rates[False])} |",
        f"| ratio | {on / off:.2f} | |",
    ]


def server_figures(line: str) -> tuple[float | None, float | None]:
    """(TTFT ms, tok/s) from the status line, None where absent."""
    ttft = re.search(r"TTFT (\d+) ms", line)
    rate = re.search(r"([\d.]+) tok/s", line)
    return (float(ttft[1]) if ttft else None, float(rate[1]) if rate else None)


def measure_reply(pg: Any) -> dict[str, float | None]:
    """Send PROMPT to an empty chat, wait for the end; what the page saw, in ms from Enter."""
    clear_chat(pg)
    arm_recorder(pg)
    send(pg, PROMPT)
    wait_for(lambda: recorded(pg)["finished"], "the reply to finish", 600)
    time.sleep(0.5)  # a last text update may land just after the status
    lat = recorded(pg)
    texts, enter = lat["texts"], lat["enter"]
    span = (texts[-1][0] - texts[0][0]) / 1000 if len(texts) > 1 else 0.0
    ttft, rate = server_figures(status(pg))
    return {
        "first_ms": texts[0][0] - enter if texts else None,
        "updates_per_s": (len(texts) - 1) / span if span > 0 else None,
        "last_ms": texts[-1][0] - enter if texts else None,
        "chars": texts[-1][1] if texts else 0,
        "server_ttft_ms": ttft,
        "server_tok_s": rate,
    }


def measure_stop(pg: Any) -> dict[str, float | None]:
    """A long reply, Stop clicked by the page on its first rendered text: when the text
    stopped growing (its last change after the click) and the status line first said
    stopped, in ms after the click; whether the reply kept is the text shown at the click."""
    clear_chat(pg)
    arm_recorder(pg)
    pg.evaluate(STOP_ON_FIRST, "bot")
    send(pg, PROMPT)
    wait_for(lambda: recorded(pg)["finished"], "the reply to end", 600)
    time.sleep(1.0)  # anything still arriving after the status counts against Stop
    lat = recorded(pg)
    after = [t for t, _ in lat["texts"] if t > lat["stop"]]
    said = [t for t, s in lat["statuses"] if t >= lat["stop"] and re.search(STOPPED, s)]
    return {
        "text_stopped_ms": (max(after) - lat["stop"]) if after else 0.0,
        "status_ms": (said[0] - lat["stop"]) if said else None,
        "cancelled": float("finished: cancelled" in status(pg)),
        "kept_as_shown": float(bot_texts(pg)[-1] == lat["stopText"]),
        "chars_at_end": float(len(bot_texts(pg)[-1])),
    }


def stop_row(on: bool, rows: list[dict[str, Any]]) -> str:
    """One row of the Stop table: the worst of the replies, then each."""

    def worst(key: str) -> str:
        values = [r[key] for r in rows]
        if any(v is None for v in values):
            return "never"
        each = ", ".join(f"{v:.0f}" for v in values)
        return f"worst {max(values):.0f} ({each})"

    n = len(rows)
    cancelled = sum(int(r["cancelled"]) for r in rows)
    kept = sum(int(r["kept_as_shown"]) for r in rows)
    return (
        f"| {'all on' if on else 'off'} | {worst('text_stopped_ms')} | {worst('status_ms')} | "
        f"{cancelled} of {n} | {kept} of {n} |"
    )


def median(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    return f"{statistics.median(values):.0f}" if values else "–"


def run(args: argparse.Namespace) -> list[str]:
    from playwright.sync_api import sync_playwright

    extra = ["--model", args.model] if args.model else []
    server = start_app(Path(tempfile.mkdtemp(prefix="browser-latency-")), *extra)
    lines = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": 1500, "height": 1100})
            pg.set_default_timeout(600_000)
            open_app(pg, server.url)
            set_number(pg, "max-new-tokens", args.max_new_tokens)
            pg.fill("#seed textarea, #seed input", args.seed)
            lines.append(
                "| views | first text (ms) | text updates/s | last text (ms) | reply chars | "
                "server TTFT (ms) | server tok/s |"
            )
            lines.append("|---|---|---|---|---|---|---|")
            for on in (True, False):
                set_views(pg, on)
                rows = [measure_reply(pg) for _ in range(args.runs)]
                print(on, rows, flush=True)
                cells = [median(rows, k) for k in ("first_ms", "updates_per_s", "last_ms")]
                cells += [median(rows, "chars")]
                cells += [median(rows, k) for k in ("server_ttft_ms", "server_tok_s")]
                lines.append(f"| {'all on' if on else 'off'} | " + " | ".join(cells) + " |")
            lines += [
                "",
                "| views | Stop: text stopped (ms after click) | status said stopped (ms) | "
                "cancelled | kept = shown at click |",
                "|---|---|---|---|---|",
            ]
            set_number(pg, "max-new-tokens", 1024)
            for on in (True, False):
                set_views(pg, on)
                rows = [measure_stop(pg) for _ in range(args.runs)]
                print("stop", on, rows, flush=True)
                lines.append(stop_row(on, rows))
            browser.close()
    finally:
        server.stop()
    return lines


def main() -> None:
    args = parse_args()
    lines = run_server_only(args) if args.server_only else run(args)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"Command: python bench/browser_latency.py {' '.join(sys.argv[1:])}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

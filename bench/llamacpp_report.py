"""The llama.cpp section of bench/RESULTS.md (bench/decode.py --peer llamacpp)."""

from __future__ import annotations

from typing import Any

from bench.common import median, spread
from bench.decode_report import _common_prefix, _pair
from bench.decode_runs import Runtime

SECTION = "# Ours against llama.cpp, same weights and precision"
HEADER = (
    "| preset | ours / llama.cpp | prefill tok/s | decode tok/s | TTFT ms, 128-token prompt "
    "| TTFT ms, 100-token prompt | peak RSS MiB | same greedy tokens |\n"
    "|---|---|---|---|---|---|---|---|"
)
# The decode targets, ours/llama.cpp at the same precision (int8 has none against Q8_0)
DECODE_TARGET = {"shipped": 0.5, "stories15M": 0.8, "tinyllama-1.1b": 0.8, "smollm2": 0.8}


def table(pairs: list[tuple[str, Runtime, Runtime]]) -> str:
    """One row per (preset, ours, llama.cpp); ratios ours/theirs (times theirs/ours)."""
    lines = [HEADER]
    for preset, o, t in pairs:
        same = len(_common_prefix(o.tokens, t.tokens))
        rss = f"{o.resident_mb + o.transient_mb:.0f} / {t.resident_mb + t.transient_mb:.0f}"
        lines.append(
            " | ".join(
                [
                    f"| {preset}",
                    f"{o.name} / {t.name}",
                    _pair(o.prefill, t.prefill),
                    _pair(o.decode, t.decode, fmt=".1f"),
                    _pair(o.ttft, t.ttft, 1e3, ".1f", higher_better=False),
                    _pair(o.ttft_short, t.ttft_short, 1e3, ".1f", higher_better=False),
                    rss,
                    f"{same}/{len(o.tokens)} |",
                ]
            )
        )
    return "\n".join(lines)


def spreads(pairs: list[tuple[str, Runtime, Runtime]]) -> str:
    lines = ["| preset | runtime | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
    seen: set[int] = set()  # a llama.cpp runtime paired with ours eager and compiled: once
    for preset, o, t in pairs:
        lines += [
            f"| {preset} | {rt.name} | {spread(rt.prefill)} | {spread(rt.decode)} |"
            for rt in (o, t)
            if id(rt) not in seen and not seen.add(id(rt))
        ]
    return "\n".join(lines)


def targets(pairs: list[tuple[str, Runtime, Runtime]]) -> str:
    lines = []
    by_preset: dict[str, dict[str, Runtime]] = {}
    for preset, o, t in pairs:
        by_preset.setdefault(preset, {})[o.name] = o
        dec, pre = median(o.decode) / median(t.decode), median(o.prefill) / median(t.prefill)
        want = DECODE_TARGET.get(preset)
        if want is not None and "int8" not in o.name:
            lines.append(
                _check(f"{preset}: {o.name} decode >= {want}x {t.name}", dec >= want, f"{dec:.2f}x")
            )
        if "int8" in o.name:
            lines.append(f"- reported: {preset}: {o.name} decode / {t.name} = {dec:.2f}x")
        lines.append(
            _check(f"{preset}: {o.name} prefill >= 0.8x {t.name}", pre >= 0.8, f"{pre:.2f}x")
        )
    for preset, ours in by_preset.items():
        if "ours int8" in ours and "ours bf16" in ours and preset == "tinyllama-1.1b":
            r = median(ours["ours int8"].decode) / median(ours["ours bf16"].decode)
            lines.append(
                _check(f"{preset}: ours int8 decode faster than ours bf16", r > 1, f"{r:.2f}x")
            )
    return "\n".join(lines)


def _check(what: str, ok: bool, value: str) -> str:
    return f"- {'met' if ok else '**not met**'}: {what} ({value})"


def section(pairs: list[tuple[str, Runtime, Runtime]], ctx: dict[str, Any]) -> str:
    """The whole section. ctx: cmd, started, machine, load_before, load_after, skipped,
    rounds, prompt_len, new_tokens, version."""
    skip = "".join(f"\n- **{n}** skipped: {why}." for n, why in ctx["skipped"])
    return f"""{SECTION}

Regenerate with `{ctx["cmd"]}` ({ctx["started"]}); see bench/llamacpp.py for the protocol.

- Machine: {ctx["machine"]}; llama-cpp-python {ctx["version"]}.
- {ctx["rounds"]} timed rounds per preset after a warm-up, all runtimes interleaved
  (order reversed every round), medians; load average before / after: {ctx["load_before"]} /
  {ctx["load_after"]}. The machine is shared: compare within a row. Prompt
  {ctx["prompt_len"]} random tokens, {ctx["new_tokens"]} new tokens, greedy.
- Ours: `load(weights=...)` of the bench's checkpoint and `llama.generate.generate`;
  llama.cpp: `Llama.eval` per token and an argmax over `llama_get_logits_ith` (its Python
  binding's per-call cost is in its figures, as ours is in ours).{skip}

{table(pairs)}

## Against the issue's targets (this run)

{targets(pairs)}

## Spread over rounds, median (min-max)

{spreads(pairs)}
"""


def replace_section(old: str, new: str) -> str:
    """RESULTS.md with this section replaced (or appended when absent)."""
    start = old.find(SECTION)
    if start < 0:
        return old.rstrip("\n") + "\n\n" + new
    end = old.find("\n# ", start + 1)
    tail = old[end + 1 :] if end >= 0 else ""
    return old[:start] + new.rstrip("\n") + "\n" + ("\n" + tail if tail else "")

"""Rows, tables and RESULTS.md for bench/decode.py."""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import BenchPreset, median, spread
from bench.decode_runs import Runtime
from bench.membw import bandwidth
from llama.config import ModelArgs


def decode_bytes(args: ModelArgs, item: float, kv_item: int, position: float) -> float:
    """Bytes one decode step reads: every weight but the embedding table (one row of it),
    plus the KV cache up to `position`."""
    weights = args.n_params() - args.vocab_size * args.dim + args.dim
    kv = 2 * args.n_layers * args.kv_heads * args.head_dim * position
    return weights * item + kv * kv_item


def row(
    preset: BenchPreset,
    threads: int,
    ours: Runtime,
    theirs: Runtime,
    bw_before: dict[str, float],
    bw_after: dict[str, float],
    a: argparse.Namespace,
) -> dict[str, Any]:
    item = {"fp32": 4, "bf16": 2, "fp16": 2}[a.dtype_name]
    weight_item = 1.0 if a.load_in_8bit else item
    per_token = decode_bytes(preset.args, weight_item, item, a.prompt_len + a.new_tokens / 2)
    bw = max(bandwidth(bw_before), bandwidth(bw_after))
    same = sum(1 for _ in _common_prefix(ours.tokens, theirs.tokens))
    return {
        "preset": preset.name,
        "note": preset.note,
        "threads": threads,
        "params_m": preset.args.n_params() / 1e6,
        "ours": ours,
        "theirs": theirs,
        "bytes_per_token": per_token,
        "bw": bw,
        "bw_before": bw_before,
        "bw_after": bw_after,
        "same_greedy": same,
        "n_tokens": len(ours.tokens),
    }


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    out = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        out.append(x)
    return out


def _pair(
    ours: list[float],
    theirs: list[float],
    scale: float = 1.0,
    fmt: str = ".0f",
    higher_better: bool = True,
) -> str:
    if not ours:
        return "n/a"
    o = median(ours) * scale
    if not theirs:
        return f"{o:{fmt}} / n/a"
    t = median(theirs) * scale
    ratio = o / t if higher_better else t / o
    return f"{o:{fmt}} / {t:{fmt}} (**{ratio:.2f}x**)"


def _gbs(r: dict[str, Any], rt: Runtime) -> str:
    if not rt.decode:
        return "n/a"
    gbs = r["bytes_per_token"] * median(rt.decode) / 1e9
    return f"{gbs:.2f} ({100 * gbs / r['bw']:.0f}%)"


HEADER = (
    "| preset | params | threads | prefill tok/s ours / HF | decode tok/s ours / HF "
    "| TTFT ms, 128-token prompt | TTFT ms, 100-token prompt | peak RSS MiB ours / HF "
    "| decode GB/s (% of bandwidth) ours / HF | same greedy tokens |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def table(rows: list[dict[str, Any]]) -> str:
    """The results table; ratios are ours/HF for rates and HF/ours for times (higher = ours
    better)."""
    lines = [HEADER]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        rss = f"{o.resident_mb + o.transient_mb:.0f} / " + (
            "n/a" if t.error else f"{t.resident_mb + t.transient_mb:.0f}"
        )
        lines.append(
            " | ".join(
                [
                    f"| {r['preset']}" + (" (compiled)" if o.name.endswith("compiled") else ""),
                    f"{r['params_m']:.1f}M",
                    str(r["threads"]),
                    _pair(o.prefill, t.prefill),
                    _pair(o.decode, t.decode, fmt=".1f"),
                    _pair(o.ttft, t.ttft, 1e3, ".1f", higher_better=False),
                    _pair(o.ttft_short, t.ttft_short, 1e3, ".1f", higher_better=False),
                    rss,
                    f"{_gbs(r, o)} / {_gbs(r, t)}",
                    (f"{r['same_greedy']}/{r['n_tokens']}" if t.tokens else "n/a") + " |",
                ]
            )
        )
    return "\n".join(lines)


def spreads(rows: list[dict[str, Any]]) -> str:
    """Median (min-max) over rounds for every rate, to show the noise."""
    lines = [
        "| preset | runtime | prefill tok/s | decode tok/s | TTFT ms (128) | TTFT ms (100) |",
        "|---|---|---|---|---|---|",
    ]
    shown: set[int] = set()
    for r in rows:
        for rt in (r["ours"], r["theirs"]):
            if id(rt) in shown:  # transformers is shared by a preset's rows
                continue
            shown.add(id(rt))
            if rt.error:
                lines.append(f"| {r['preset']} | {rt.name} | {rt.error} | | | |")
                continue
            ms = [x * 1e3 for x in rt.ttft]
            ms_short = [x * 1e3 for x in rt.ttft_short]
            lines.append(
                f"| {r['preset']} | {rt.name}{rt.variant} | {spread(rt.prefill)} | "
                f"{spread(rt.decode)} | {spread(ms)} | {spread(ms_short)} |"
            )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> str:
    """The issue's CPU targets, each checked against this run's medians."""
    lines = []
    for r in rows:
        o, t = r["ours"], r["theirs"]
        if not o.decode or not t.decode:
            continue
        label = r["preset"] + (" (compiled)" if o.name.endswith("compiled") else "")
        dec = median(o.decode) / median(t.decode)
        pre = median(o.prefill) / median(t.prefill)
        want = {"shipped": 3.0, "stories15M": 3.0, "tinyllama-1.1b": 1.3}.get(r["preset"])
        if want is not None:
            lines.append(
                _check(f"{label}: decode >= {want}x transformers", dec >= want, f"{dec:.2f}x")
            )
        lines.append(_check(f"{label}: prefill >= 1.2x transformers", pre >= 1.2, f"{pre:.2f}x"))
        if r["preset"] == "tinyllama-1.1b":
            frac = r["bytes_per_token"] * median(o.decode) / 1e9 / r["bw"]
            lines.append(
                _check(
                    f"{label}: decode >= 70% of memory bandwidth", frac >= 0.7, f"{100 * frac:.0f}%"
                )
            )
        if r["preset"] == "shipped":
            ms = median(o.ttft_short) * 1e3
            lines.append(
                _check(f"{label}: TTFT, 100-token prompt < 50 ms", ms < 50, f"{ms:.1f} ms")
            )
    return "\n".join(lines)


def _check(what: str, ok: bool, value: str) -> str:
    return f"- {'met' if ok else '**not met**'}: {what} ({value})"


def results_markdown(tab: str, rows: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    """bench/RESULTS.md. ctx: a (the arguments), argv, started, machine, load_before,
    load_after, bw (membw at the start), skipped [(preset, reason)], ops (markdown or "")."""
    a = ctx["a"]
    cmd = ("python bench/decode.py " + " ".join(ctx["argv"])).strip()
    bws = ", ".join(f"{k} {v:.1f}" for k, v in ctx["bw"].items())
    per = "; ".join(
        f"{r['preset']}: {bandwidth(r['bw_before']):.1f} before, "
        f"{bandwidth(r['bw_after']):.1f} after"
        for r in rows
        if not r["ours"].name.endswith("compiled")
    )
    times = ", ".join(
        f"{r['preset']} {r['ours'].compile_s:.0f} s" for r in rows if r["ours"].compile_s
    )
    compiled = f"; (compiled) rows: ours with `compile_decode`, compiled in {times}" * bool(times)
    skip = "".join(f"\n- **{n}** skipped: {why}." for n, why in ctx["skipped"])
    ops_head = "## Per-op choices (bench/ops.py; one thread unless the shape names more)"
    ops = f"\n{ops_head}\n\n{ctx['ops']}\n" * bool(ctx["ops"])
    return f"""# Decode benchmark: our runtime vs Hugging Face transformers

Regenerate with `{cmd}` ({ctx["started"]}).

- Machine: {ctx["machine"]}
- Device {a.device}, dtype {a.dtype_name}{", 8-bit weights" if a.load_in_8bit else ""}\
{compiled}. {a.rounds} timed rounds per preset ({a.heavy_rounds} above 500M parameters)
  after a warm-up; runtimes interleaved, the order reversed every round; medians. Ratios in
  bold: higher means ours is better (rates ours/theirs, times theirs/ours).
- Load average before / after: {ctx["load_before"]} / {ctx["load_after"]}. The machine is
  shared with other jobs: rates move by 2x or more between rounds (see the spread table);
  compare the runtimes within a row, not across runs.
- Memory bandwidth (bench/membw.py, GB/s, all cores): {bws}. Per preset, max(copy, triad)
  on the preset's threads: {per}. The GB/s column is weights + KV cache read per token times
  decode tokens/s; its % divides by the better of the two measurements.
- Prompt {a.prompt_len} random tokens, {a.new_tokens} new tokens, greedy. Ours: `load()` of
  the HF-layout checkpoint (it calls `prepare_for_decode()`), `llama.generate.generate`
  (temperature 0, n_top=0, EOS ignored). Transformers: `generate(do_sample=False,
  min_new_tokens=N)`, the better of its dynamic and static caches. Decode tokens/s count
  the tokens after the first.{skip}

{tab}

## Against the issue's targets (this run)

{targets(rows)}

## Spread over rounds, median (min-max)

{spreads(rows)}
{ops}"""


def replace_decode_section(old: str, decode: str) -> str:
    """RESULTS.md with its decode part (everything before the second top-level "# " heading)
    replaced by `decode`; the other benchmarks' sections after it are kept as they are."""
    cut = old.find("\n# ", 1)
    tail = old[cut + 1 :] if cut >= 0 else ""
    return decode.rstrip("\n") + "\n" + ("\n" + tail if tail else "")


"""What watching costs: decode tokens/s with no probe, the default probe, every layer traced
and each Why view (logit lens, attention sinks, attribution: llama/probes/why.py).

    python bench/probe_overhead.py [--model DIR_OR_FILE] [--passes 6] [--tokens 480] [--threads 1]
    python bench/probe_overhead.py --screenshots assets/screenshots   # PNGs of every figure

Model: the shipped one (assets/tinychat); if it is absent, stories260K from ../shared/data
(the output says which). Method: prefill a fixed prompt, then greedy-decode to the end of the
context (or --tokens); every decode token is timed under one variant, the variants taking
turns in shuffled blocks, so that the noise of a shared machine and the growing context fall
on all of them alike. A token's time covers what generate() adds per token: probe.on_step (and
a snapshot when due) plus the model forward, plus a share of the probe's end() (where rows
not yet computed in a batch are). Each probe keeps its own begin/end and sees only its own
tokens (its rows have gaps: fine for timing). We report the median and a trimmed mean
of the per-token times, on the wall clock and on the decoding thread's CPU clock.

"no hooks" is the same model with every Attention switched to a subclass whose forward is
Attention.forward's own source with the `if self.observer is not None:` block removed
(generated from the source at run time, checked to give identical logits), so the only
difference from "no probe" is the per-layer observer check, also timed on its own at the end.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import random
import statistics
import sys
import textwrap
import time
import timeit
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import model as model_module
from llama.assets import SHIPPED_MODEL_DIR
from llama.checkpoints import load
from llama.probes import Probe
from llama.probes.why import WhyProbe
from llama.tokenizer import Tokenizer, open_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
FALLBACK = SHARED / "data" / "stories260K" / "stories260K.bin"
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside"
TRIM = 0.1  # fraction cut from each end for the trimmed mean


def no_hook_attention() -> type:
    """Attention whose forward has no observer check (built from the real source)."""
    src = textwrap.dedent(inspect.getsource(model_module.Attention.forward)).splitlines()
    out, skip_indent = [], None
    for line in src:
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None and (not line.strip() or indent > skip_indent):
            continue
        skip_indent = None
        if line.strip() == "if self.observer is not None:":
            skip_indent = indent
            continue
        out.append(line)
    if len(out) == len(src):
        raise RuntimeError("Attention.forward has no 'if self.observer is not None:' block")
    namespace: dict = {}
    exec("\n".join(out), vars(model_module), namespace)
    return type("NoHookAttention", (model_module.Attention,), {"forward": namespace["forward"]})


def set_hooks(model: torch.nn.Module, hooked: bool, no_hook_cls: type) -> None:
    for block in model.layers:
        block.attention.__class__ = model_module.Attention if hooked else no_hook_cls


@dataclass
class Variant:
    name: str
    hooked: bool = True
    probe: Probe | None = None
    snapshot_every: int = 0
    steps: int = 0
    wall: list[float] = field(default_factory=list)  # seconds per token
    cpu: list[float] = field(default_factory=list)


@torch.inference_mode()
def decode_pass(
    model: torch.nn.Module,
    prompt: list[int],
    n: int,
    variants: list[Variant],
    no_hook_cls: type,
    rng: random.Random,
) -> None:
    """Prefill (untimed), then n decode tokens, each timed under the next variant in turn.

    A probe computes its decode rows in batches (at snapshot, at end, every `window` steps):
    its end() is timed too and spread evenly over that variant's tokens of the pass.
    """
    first = {id(v): len(v.wall) for v in variants}
    for v in variants:
        if v.probe is not None:
            v.probe.begin(model, prompt)
    model.set_observer(None)
    model.set_residual_observer(None)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)), last_only=True)
    order: list[Variant] = []
    for pos in range(len(prompt), len(prompt) + n):
        order = order or rng.sample(variants, len(variants))
        v = order.pop()
        set_hooks(model, v.hooked, no_hook_cls)
        if v.probe is not None:
            v.probe.attach(model)
        token = logits[0, -1].argmax().view(1, 1)  # (1, 1)
        t0, c0 = time.perf_counter(), time.thread_time()
        if v.probe is not None:
            v.probe.on_step(SimpleNamespace(token_id=int(token), position=pos))
            v.steps += 1
            if v.snapshot_every and v.steps % v.snapshot_every == 0:
                v.probe.snapshot()
        logits = model(token, torch.tensor([pos]), last_only=True)
        v.wall.append(time.perf_counter() - t0)
        v.cpu.append(time.thread_time() - c0)
        model.set_observer(None)
        model.set_residual_observer(None)
        set_hooks(model, True, no_hook_cls)
    for v in variants:
        if v.probe is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            v.probe.end(model)
            spread_over(v.wall, first[id(v)], time.perf_counter() - t0)
            spread_over(v.cpu, first[id(v)], time.thread_time() - c0)


def spread_over(samples: list[float], start: int, extra: float) -> None:
    share = extra / max(1, len(samples) - start)
    for i in range(start, len(samples)):
        samples[i] += share


def load_model(path: str | None) -> tuple[torch.nn.Module, Tokenizer, str, Path]:
    if path is None and (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        path, note = str(SHIPPED_MODEL_DIR), "the shipped model (assets/tinychat)"
    elif path is None:
        path, note = str(FALLBACK), "stories260K: the shipped model assets/tinychat is ABSENT"
    else:
        note = "given on the command line"
    loaded = load(path, device="cpu", dtype=torch.float32, progress=False)
    loaded.model.setup_caches(1)
    assert loaded.tokenizer_path is not None, f"{path}: no tokenizer beside the weights"
    return loaded.model, open_tokenizer(loaded), f"{path} ({note})", loaded.path


def check_same_logits(model: torch.nn.Module, prompt: list[int], no_hook_cls: type) -> None:
    with torch.inference_mode():
        ref = model(torch.tensor([prompt]), torch.arange(len(prompt)))
        set_hooks(model, False, no_hook_cls)
        other = model(torch.tensor([prompt]), torch.arange(len(prompt)))
        set_hooks(model, True, no_hook_cls)
    torch.testing.assert_close(ref, other, rtol=0, atol=0)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tok, where, _ = load_model(args.model)
    margs = model.args
    prompt = tok.encode(PROMPT)
    n = min(args.tokens, margs.max_seq_len - len(prompt) - 1)
    no_hook_cls = no_hook_attention()
    check_same_logits(model, prompt, no_hook_cls)
    variants = [
        Variant("no hooks", hooked=False),
        Variant("no probe"),
        Variant("default probe (layer 0, all heads)", probe=Probe(margs, token_pieces=tok.piece)),
        Variant(
            "default probe + snapshot every 8",
            snapshot_every=8,
            probe=Probe(margs, token_pieces=tok.piece),
        ),
        Variant(
            f"all {margs.n_layers} layers traced",
            probe=Probe(margs, layers=None, token_pieces=tok.piece),
        ),
        Variant(  # what ui/turn.py builds for models of <= 12 layers, redrawn every 8 tokens
            "all layers, window 64, snapshot every 8",
            snapshot_every=8,
            probe=Probe(margs, layers=None, window=64, token_pieces=tok.piece),
        ),
        *why_variants(margs),
    ]
    rng = random.Random(0)
    measure(model, prompt, n, variants, no_hook_cls, rng, args.passes)
    header(where, margs, n, args, len(variants[0].wall))
    table({v.name: v.wall for v in variants}, "wall clock")
    table({v.name: v.cpu for v in variants}, "CPU time of the decoding thread")
    # The 2% question needs more samples than the table: only the two variants, taking turns.
    pair = [Variant("no hooks", hooked=False), Variant("no probe")]
    measure(model, prompt, n, pair, no_hook_cls, rng, args.passes * 2)
    hook_check(pair, rng)
    check_cost(model)


def why_variants(margs: object) -> list[Variant]:
    """Each Why view alone and all three, as the Why tab builds them (window 64, snapshot
    every 8 tokens as the playground redraws; the lens at its default layers), and the lens
    at every layer (the tab's "lens every" at 1)."""
    views = {"lens": {"lens"}, "sinks": {"sinks"}, "attribution": {"attribution"}}
    views["all three"] = {"lens", "sinks", "attribution"}
    every = {name: None for name in views}
    views["lens, every layer"], every["lens, every layer"] = {"lens"}, 1
    return [
        Variant(
            f"Why: {name}",
            snapshot_every=8,
            probe=WhyProbe(
                margs,
                **{k: k in on for k in ("lens", "sinks", "attribution")},
                lens_every=every[name],
            ),
        )
        for name, on in views.items()
    ]


def measure(
    model: torch.nn.Module,
    prompt: list[int],
    n: int,
    variants: list[Variant],
    no_hook_cls: type,
    rng: random.Random,
    passes: int,
) -> None:
    decode_pass(model, prompt, min(n, 50), variants, no_hook_cls, rng)  # warm-up
    for v in variants:
        v.wall.clear()
        v.cpu.clear()
    for _ in range(passes):
        decode_pass(model, prompt, n, variants, no_hook_cls, rng)


def hook_check(pair: list[Variant], rng: random.Random, resamples: int = 2000) -> None:
    """Extra CPU time per token of 'no probe' over 'no hooks' (ratio of medians - 1), with a
    95% bootstrap interval from resampling the per-token times."""
    a, b = torch.tensor(pair[0].cpu), torch.tensor(pair[1].cpu)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    ia = torch.randint(len(a), (resamples, len(a)), generator=gen)
    ib = torch.randint(len(b), (resamples, len(b)), generator=gen)
    ratios = (b[ib].median(1).values / a[ia].median(1).values - 1).sort().values
    lo, hi = float(ratios[int(0.025 * resamples)]), float(ratios[int(0.975 * resamples)])
    est = float(b.median() / a.median() - 1)
    print(f"\n## no probe vs no hooks ({len(a)} + {len(b)} tokens, the two taking turns, CPU)")
    print(
        f"extra time per token: {est:+.2%} (95% bootstrap interval {lo:+.2%}..{hi:+.2%}); "
        "target: within 2%"
    )


def header(where: str, margs: object, n: int, args: argparse.Namespace, samples: int) -> None:
    print(f"# probe overhead, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"model: {where}\n  {margs}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}, python {platform.python_version()}"
    )
    print(f"command: python bench/probe_overhead.py {' '.join(sys.argv[1:])}")
    print(
        f"decode: {args.passes} passes of {n} greedy tokens after a {len(PROMPT)}-char prompt, "
        f"{samples} timed tokens per variant; 'cost' = extra time per token against 'no probe'"
    )


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def trimmed_mean(values: list[float]) -> float:
    cut = int(len(values) * TRIM)
    kept = sorted(values)[cut : len(values) - cut]
    return sum(kept) / len(kept)


def table(times: dict[str, list[float]], clock: str) -> None:
    """tokens/s from the median and the trimmed mean of per-token seconds, and the cost."""
    print(f"\n## {clock}")
    base = times["no probe"]
    base_med, base_mean = statistics.median(base), trimmed_mean(base)
    print(
        f"{'variant':40s} {'tok/s(med)':>10s} {'tok/s(mean)':>11s} {'cost(med)':>10s} "
        f"{'cost(mean)':>10s}"
    )
    for name, values in times.items():
        med, mean = statistics.median(values), trimmed_mean(values)
        print(
            f"{name:40s} {1 / med:10.1f} {1 / mean:11.1f} {med / base_med - 1:+10.1%} "
            f"{mean / base_mean - 1:+10.1%}"
        )


def check_cost(model: torch.nn.Module) -> None:
    """The whole difference between 'no probe' and 'no hooks': one attribute test per layer."""
    attn = model.layers[0].attention
    loops = 1_000_000
    check = min(timeit.repeat("attn.observer is not None", globals={"attn": attn}, number=loops))
    empty = min(timeit.repeat("attn", globals={"attn": attn}, number=loops))
    per_layer = max(0.0, check - empty) / loops
    print(
        f"\nthe observer check itself (best of 5 timeit runs, minus an empty statement): "
        f"{per_layer * 1e9:.0f} ns per layer, {per_layer * len(model.layers) * 1e6:.2f} us "
        f"per token for {len(model.layers)} layers; the residual observer (the Why lens) "
        "adds one such test per forward, not per layer"
    )


def screenshots(out: Path, model_path: str | None) -> None:
    """Render every figure for a real probed generation to out/fig_*.png (kaleido)."""
    from llama.chat import encode_dialog
    from llama.generate import generate
    from llama.sampling import SamplingParams
    from ui import figures
    from ui.runtime import detect_template

    model, tok, where, path = load_model(model_path)
    args = model.args
    layer = args.n_layers // 2
    probe = Probe(args, layers={0, layer}, rope_head=0, window=48, token_pieces=tok.piece)
    prompt = (
        encode_dialog(tok, [{"role": "user", "content": "Tell me a story about a cat."}])
        if detect_template(path) == "chat"
        else tok.encode(PROMPT)
    )
    steps = list(
        generate(
            model,
            tok,
            prompt,
            SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=3, max_new_tokens=32),
            probe=probe,
        )
    )
    trace = probe.snapshot()
    figs = {
        "attention_heads": figures.attention_by_group(trace, layer),
        "attention_group_mean": figures.attention_by_group(trace, 0, mode="mean"),
        "rope_rotation": figures.rope_rotation(trace, 0),
        "kv_cache_growth": figures.kv_cache_growth(trace),
        "token_probabilities": figures.token_probabilities(steps[-1]),
        **{f"rope_lab_{k}": f for k, f in figures.rope_lab(args).items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        fig.update_layout(paper_bgcolor="white")  # PNGs have no page behind them
        fig.write_image(out / f"fig_{name}.png", width=1200, scale=1)
    print(f"rendered {len(figs)} figures for {where} into {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: assets/tinychat, else stories260K)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=480,
        help="decode tokens per pass (at most the context left after the prompt)",
    )
    parser.add_argument("--passes", type=int, default=6, help="prefill + decode passes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--screenshots", type=Path, help="render figure PNGs here instead")
    args = parser.parse_args()
    if args.screenshots:
        screenshots(args.screenshots, args.model)
    else:
        run(args)


if __name__ == "__main__":
    main()

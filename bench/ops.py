"""The small choices behind the decode step, each measured against its alternatives.

One decode step (T = 1) of the shipped model's shape and of TinyLlama-1.1B's, on one thread:
- attention for GQA: SDPA's enable_gqa, K/V repeat_interleave, K/V expand, and ours (the
  query heads of a group as rows of one query matrix over the group's KV head);
- RoPE: llama.rope.apply_rope on q and k, against ours (one in-place complex multiply over
  the fused q|k heads);
- RMSNorm, at decode (1 token) and prefill (128 tokens): Meta's formula in torch ops,
  F.rms_norm, and ours (llama.functional.rms_norm: the same steps in place);
- a whole decode step of the shipped model: unfused modules against fused projections on
  the fast route (Python overhead and projection fusion together);
- the fp32 product for LLaMA projection shapes (SmolLM2, stories15M, TinyLlama), decode and
  128-row prefill, on one thread and on every physical core, the weights cycled so none is
  read from the cache: MKL (F.linear) row-major and column-major
  (llama.fusion.store_column_major) against oneDNN's inner product: why
  llama.functional.linear takes oneDNN;
- weight precisions for one TinyLlama-1.1B layer's four products (176 MB in fp32: larger
  than the L3 cache, as in a real decode), on every physical core: fp32, bf16, our int8
  (llama.int8.Int8Linear) and the int8 candidates behind its choice (_weight_int8pack_mm
  with fp32 activations, a compiled dequantise-in-the-product, fbgemm's dynamic int8 that
  also rounds activations to 8 bits), at decode (1 row) and prefill (128 rows; there also
  bf16 weights upcast to fp32 per product, what CPUs without hardware bf16 do);
- the floor of a decode step, on every physical core: all its matrix products back to back
  (weights as `load()` prepares them) and nothing else, for the shipped and stories15M
  shapes. No decode step of either runtime can take less.

Alternatives run interleaved, round after round; per call: min and median microseconds.

    python bench/ops.py [--rounds 20] [--markdown] [--only precision|layout]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_presets
from llama.config import PRESETS, ModelArgs
from llama.functional import onednn_fp32, rms_norm, rotate_heads_
from llama.int8 import Int8Linear, gemm_dtype
from llama.model import Transformer
from llama.rope import apply_rope, rope_tables
from llama.runtime_opts import physical_cores


def compare(fns: dict[str, Callable[[], object]], rounds: int, n: int = 50) -> dict[str, tuple]:
    """{name: (min us, median us)} per call, alternatives interleaved within each round."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {k: (min(v), sorted(v)[len(v) // 2]) for k, v in times.items()}


def attention_cases(a: ModelArgs, kv_len: int) -> dict[str, Callable[[], object]]:
    H, H_kv, D = a.n_heads, a.kv_heads, a.head_dim
    rep = H // H_kv
    q = torch.randn(1, H, 1, D)
    k, v = torch.randn(1, H_kv, kv_len, D), torch.randn(1, H_kv, kv_len, D)

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None].expand(1, H_kv, rep, kv_len, D).reshape(1, H, kv_len, D)

    return {
        "SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "repeat_interleave": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        ),
        "expand": lambda: F.scaled_dot_product_attention(q, expand(k), expand(v)),
        "group rows (ours)": lambda: F.scaled_dot_product_attention(q.view(1, H_kv, rep, D), k, v),
    }


def rope_cases(a: ModelArgs) -> dict[str, Callable[[], object]]:
    H, H_kv, D = a.n_heads, a.kv_heads, a.head_dim
    qkv = torch.randn(1, 1, H + 2 * H_kv, D)
    cos, sin = rope_tables(64, D)
    cos, sin = cos[7:8], sin[7:8]
    rot = torch.complex(cos, sin).unsqueeze(1)
    return {
        "apply_rope(q), apply_rope(k)": lambda: (
            apply_rope(qkv[:, :, :H], cos, sin),
            apply_rope(qkv[:, :, H : H + H_kv], cos, sin),
        ),
        "in-place complex, q and k at once (ours)": lambda: rotate_heads_(qkv, rot, H + H_kv),
    }


def norm_cases(a: ModelArgs, tokens: int) -> dict[str, Callable[[], object]]:
    x, w, eps = torch.randn(1, tokens, a.dim), torch.ones(a.dim), a.norm_eps

    def meta() -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

    return {
        "Meta's formula": meta,
        "F.rms_norm": lambda: F.rms_norm(x, (a.dim,), w, eps),
        "in place (ours)": lambda: rms_norm(x, w, eps),
    }


# (out, in) of the decode products whose layout is chosen: SmolLM2's fused q|k|v, w1|w3, w2 and
# tied output; stories15M's w1|w3; TinyLlama's w1|w3 and w2.
LAYOUT_SHAPES = ((960, 576), (3072, 576), (576, 1536), (49152, 576), (1536, 288),
                 (11264, 2048), (2048, 5632))
LAYOUT_BYTES = 256e6  # copies cycled through per call, so no weight is read from the cache


def weight_layout_cases(out: int, inp: int, rows: int) -> dict[str, Callable[[], object]]:
    """One fp32 product (rows, in) x (in, out): torch's F.linear (MKL) with the weight
    row-major (as loaded) and column-major (llama.fusion.store_column_major), and oneDNN's
    inner product on the row-major weight (llama.functional.linear); each call on the next
    of enough copies to exceed the caches, as a real decode reads every weight once a token."""
    n = max(1, int(LAYOUT_BYTES // (out * inp * 4)))
    row_major = [torch.randn(out, inp) for _ in range(n)]
    column_major = [w.t().contiguous().t() for w in row_major]
    x, turn = torch.randn(1, rows, inp), [0, 0, 0]

    def cycle(ws: list[torch.Tensor], k: int) -> Callable[[], object]:
        def call() -> object:
            turn[k] = (turn[k] + 1) % n
            return F.linear(x, ws[turn[k]])

        return call

    def onednn() -> object:
        turn[2] = (turn[2] + 1) % n
        return torch.ops.mkldnn._linear_pointwise(x, row_major[turn[2]], None, "none", [], "")

    cases = {"MKL, row-major (F.linear)": cycle(row_major, 0),
             "MKL, column-major": cycle(column_major, 1)}
    if onednn_fp32():
        cases["oneDNN, row-major (ours)"] = onednn
    return cases


def floor_cases(a: ModelArgs) -> dict[str, Callable[[], object]]:
    model = Transformer(a)
    model.prepare_for_decode()
    weights = [
        w
        for b in model.layers
        for w in (b.attention.wqkv.weight, b.attention.wo.weight,
                  b.feed_forward.w13.weight, b.feed_forward.w2.weight)
    ] + [model.output.weight]
    inputs = [torch.randn(1, 1, w.shape[1]) for w in weights]

    def products() -> None:
        for x, w in zip(inputs, weights, strict=True):
            F.linear(x, w)

    return {"all matrix products, nothing else": products}


def layer_weights(a: ModelArgs) -> list[torch.Tensor]:
    """One layer's fused products (wqkv, wo, w13, w2) as `load()` makes them, fp32 (out, in)."""
    D = a.head_dim
    shapes = [((a.n_heads + 2 * a.kv_heads) * D, a.dim), (a.dim, a.n_heads * D),
              (2 * a.ffn_hidden_dim, a.dim), (a.dim, a.ffn_hidden_dim)]
    return [torch.randn(o, i) * 0.02 for o, i in shapes]


def _deq_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * scale


def precision_cases(a: ModelArgs, rows: int) -> dict[str, Callable[[], object]]:
    """The layer's four products at `rows` rows of activations, in each weight precision."""
    fp32 = layer_weights(a)
    bf16 = [w.bfloat16() for w in fp32]
    ours = [Int8Linear.from_weight(w) for w in fp32]
    xs = [torch.randn(rows, w.shape[1]) for w in fp32]
    xb = [x.bfloat16() for x in xs]

    def run(fn: Callable, ws: list, inputs: list) -> Callable[[], None]:
        return lambda: [fn(x, w) for x, w in zip(inputs, ws, strict=True)]

    cases = {
        "fp32": run(F.linear, fp32, xs),
        "bf16": run(F.linear, bf16, xb),
        "int8 (ours)": run(lambda x, m: m(x), ours, xs),
    }
    if rows == 1:
        compiled = torch.compile(_deq_product, dynamic=False)
        cases["int8pack_mm, fp32 activations"] = run(
            lambda x, m: torch.ops.aten._weight_int8pack_mm(x, m.weight, m.scale), ours, xs)
        cases["compiled dequantise-in-product, bf16"] = run(
            lambda x, m: compiled(x, m.weight, m.scale.bfloat16()), ours, xb)
        cases["fbgemm dynamic int8 (W8A8)"] = run(
            torch.ops.quantized.linear_dynamic, [_fbgemm(w) for w in fp32], xs)
    else:
        up = gemm_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
        cases["bf16 upcast to fp32 per product" + (" (this CPU's choice)" if up else "")] = run(
            lambda x, w: F.linear(x, w.float()), bf16, xs)
    return cases


def _fbgemm(w: torch.Tensor) -> object:
    scale, zero = w.abs().amax(1).double() / 127, torch.zeros(w.shape[0], dtype=torch.long)
    q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def precision_rows(rounds: int, verbose: bool) -> list[tuple[str, str, str, float, float]]:
    threads = physical_cores()
    torch.set_num_threads(threads)
    args, rows = PRESETS["tinyllama-1.1b"], []
    for n in (1, 128):
        rows += _measure(f"tinyllama layer, {threads} thread(s)",
                         f"weights, {n} row(s)" if n == 1 else f"weights, {n} rows (prefill)",
                         precision_cases(args, n), rounds, 5 if n == 1 else 1, verbose)
    return rows


def step_cases(a: ModelArgs) -> dict[str, Callable[[], object]]:
    """A whole decode step at position 128: plain modules against fused + fast route."""
    plain, fused = Transformer(a), Transformer(a)
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    out = {}
    for name, model in (("module route, unfused", plain), ("fast route, fused (ours)", fused)):
        model.setup_caches(1, max_seq_len=256)
        with torch.inference_mode():
            model(torch.zeros(1, 128, dtype=torch.long), torch.arange(128))
        pos = torch.tensor([128])
        out[name] = lambda m=model, p=pos: m(torch.zeros(1, 1, dtype=torch.long), p)
    return out


def run(
    rounds: int, verbose: bool = True, only: str | None = None
) -> list[tuple[str, str, str, float, float]]:
    """(shape, what, variant, min us, median us) for every comparison, on one thread unless
    named; only="precision": just the weight-precision rows."""
    before = torch.get_num_threads()
    if only is not None:
        with torch.inference_mode():
            rows = {"precision": precision_rows, "layout": layout_rows}[only](rounds, verbose)
        torch.set_num_threads(before)
        return rows
    torch.set_num_threads(1)
    shapes = {"shipped": bench_presets()["shipped"].args, "tinyllama": PRESETS["tinyllama-1.1b"]}
    rows = []
    try:
        with torch.inference_mode():
            for shape, args in shapes.items():
                for what, cases in _groups(shape, args).items():
                    rows += _measure(shape, what, cases, rounds, 50, verbose)
            rows += layout_rows(rounds, verbose)
            rows += floor_rows(rounds, verbose)
            rows += precision_rows(rounds, verbose)
    finally:
        torch.set_num_threads(before)
    return rows


def layout_rows(rounds: int, verbose: bool) -> list[tuple[str, str, str, float, float]]:
    rows = []
    for threads in sorted({1, physical_cores()}):
        torch.set_num_threads(threads)
        for out, inp in LAYOUT_SHAPES:
            for n in (1, 128):
                what = "fp32 product, decode" if n == 1 else "fp32 product, 128-row prefill"
                rows += _measure(f"{out} x {inp}, {threads} thread(s)", what,
                                 weight_layout_cases(out, inp, n), rounds, 5, verbose)
    return rows


def _groups(shape: str, args: ModelArgs) -> dict[str, dict[str, Callable[[], object]]]:
    groups = {f"attention, {n} cached": attention_cases(args, n) for n in (128, 1024)}
    groups |= {"RoPE": rope_cases(args), "RMSNorm, decode": norm_cases(args, 1),
               "RMSNorm, 128-token prefill": norm_cases(args, 128)}
    if shape == "shipped":
        groups["whole decode step"] = step_cases(args)
    return groups


def floor_rows(rounds: int, verbose: bool) -> list[tuple[str, str, str, float, float]]:
    threads = physical_cores()
    torch.set_num_threads(threads)
    shapes = {"shipped": bench_presets()["shipped"].args, "stories15M": PRESETS["stories15M"]}
    rows = []
    for shape, args in shapes.items():
        rows += _measure(f"{shape}, {threads} thread(s)", "decode step floor",
                         floor_cases(args), rounds, 20, verbose)
    return rows


def _measure(
    shape: str, what: str, cases: dict[str, Callable[[], object]], rounds: int, n: int,
    verbose: bool,
) -> list[tuple[str, str, str, float, float]]:
    rows = [(shape, what, name, lo, med) for name, (lo, med) in compare(cases, rounds, n).items()]
    for _, _, name, lo, med in rows if verbose else ():
        print(f"{shape:22} {what:26} {name:30} min {lo:8.1f}  med {med:8.1f}")
    return rows


def markdown(rows: list[tuple[str, str, str, float, float]]) -> str:
    lines = ["| shape | what | variant | min us | median us |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {w} | {n} | {lo:.1f} | {med:.1f} |" for s, w, n, lo, med in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--only", choices=("precision", "layout"), help="one group of rows")
    a = p.parse_args()
    rows = run(a.rounds, verbose=not a.markdown, only=a.only)
    if a.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()

"""Peak RAM and time to load a LLaMA-2-shaped bf16 checkpoint with llama.checkpoints.load.

Writes random bf16 weights once (Hugging Face layout: 2 safetensors shards + index; Meta
layout: params.json + consolidated.00.pth + tokenizer.model), then loads each in a fresh
Python process (bf16, and load_in_8bit=True) and reports the process's peak RSS
(resource.getrusage ru_maxrss) and, net of the interpreter's own baseline (python + torch), as
a ratio of the checkpoint's size; the load seconds; and the peak after one forward token
(which pages in every weight: bf16 weights are mapped from the file, not copied).
Targets (issue 2): peak while loading <= 1.2x the bf16 checkpoint; 8-bit peak <= 0.75x.

    python bench/load_memory.py --preset llama2-7b          # needs ~28 GB of /tmp, ~15 GB RAM
    python bench/load_memory.py --preset tinyllama-1.1b     # a 2.2 GB rehearsal
    python bench/load_memory.py --gguf ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

--gguf: a real GGUF file loaded by us and by transformers (from_pretrained(dir, gguf_file=...),
both dequantising to fp32), each in a fresh process, with ours / transformers ratios.

The page cache is warm (the files were just written): load seconds exclude disk reads.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llama.config import ModelArgs

# The orchestrating process imports neither torch nor llama: Linux starts a child's ru_maxrss
# at its parent's RSS (kept across fork and exec), so the parent must stay small. Writing
# and each measurement run in their own child processes.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
GIB = 1024**3


def hf_layout(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) for every tensor, in the order HF's files list them."""
    d, kv, hid = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    out = [("model.embed_tokens.weight", (args.vocab_size, d))]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (hid, d)), (p + "mlp.up_proj.weight", (hid, d)),
                (p + "mlp.down_proj.weight", (d, hid)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return [*out, ("model.norm.weight", (d,)), ("lm_head.weight", (args.vocab_size, d))]


def random_bf16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_safetensors(path: Path, items: list[tuple[str, tuple[int, ...]]],
                      gen: torch.Generator) -> None:
    """Stream one safetensors file tensor by tensor (never the whole shard in RAM)."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for _, shape in items:
            f.write(random_bf16(shape, gen).view(torch.int16).numpy().tobytes())


def write_checkpoints(args: ModelArgs, root: Path) -> dict[str, Path]:
    """HF (2 shards + index) and Meta (1 shard, same values, Meta names) layouts."""
    import torch
    from safetensors import safe_open

    from llama.checkpoints.writers import hf_config

    hf, meta = root / "hf", root / "meta"
    hf.mkdir(parents=True)
    meta.mkdir()
    layout = hf_layout(args)
    half = len(layout) // 2
    shards = {"model-00001-of-00002.safetensors": layout[:half],
              "model-00002-of-00002.safetensors": layout[half:]}
    gen = torch.Generator().manual_seed(0)
    for fname, items in shards.items():
        write_safetensors(hf / fname, items, gen)
    index = {"metadata": {}, "weight_map": {n: f for f, items in shards.items() for n, _ in items}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf / "config.json").write_text(json.dumps(hf_config(args) | {"torch_dtype": "bfloat16"}))
    write_meta_from_hf(args, hf, meta, shards, safe_open)
    return {"meta": meta, "hf": hf}


def write_meta_from_hf(args: ModelArgs, hf: Path, meta: Path, shards: dict, safe_open) -> None:
    """torch.save the same tensors under Meta names, mapped from the HF files (no RAM copy
    except q/k, which are re-permuted to Meta's interleaved layout)."""
    import torch

    from llama.checkpoints.hf import meta_name, unpermute
    from llama.rope import rope_frequencies

    state = {}
    handles = [safe_open(str(hf / f), "pt") for f in shards]
    for handle in handles:
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            t, name = handle.get_tensor(key), meta_name(key)
            if name.endswith("attention.wq.weight"):
                t = unpermute(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = unpermute(t, args.kv_heads)
            state[name] = t
    state["rope.freqs"] = rope_frequencies(args.head_dim, args.rope_theta)  # as Meta's
    torch.save(state, meta / "consolidated.00.pth")
    params = {k: v for k, v in args.to_params_json().items() if k != "max_seq_len"}
    if TOKENIZER.is_file() and args.vocab_size == 32000:
        params["vocab_size"] = -1  # as Meta ships it: the tokenizer supplies it
        shutil.copyfile(TOKENIZER, meta / "tokenizer.model")
    (meta / "params.json").write_text(json.dumps(params))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".pth", ".safetensors"))


def measure(path: Path, eight_bit: bool) -> dict[str, float]:
    """Run in the child process: load, then one forward token; report RSS peaks (bytes)."""
    import safetensors.torch  # noqa: F401  (imports load() would do: part of the baseline)
    import sentencepiece  # noqa: F401
    import torch

    from llama.checkpoints import load

    if eight_bit:
        import bitsandbytes  # noqa: F401
    with torch.device("meta"):  # first meta-device use imports torch's reference kernels
        torch.nn.Linear(2, 2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loaded = load(path, device="cpu", dtype=torch.bfloat16, load_in_8bit=eight_bit,
                  max_seq_len=256, progress=False)
    load_s = time.perf_counter() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        loaded.model(torch.tensor([[1]]))
    forward_s = time.perf_counter() - t0
    peak_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": base, "peak_load": peak_load, "load_s": load_s,
            "peak_forward": peak_fwd, "forward_s": forward_s}


def measure_gguf(path: Path, runtime: str) -> dict[str, float]:
    """In the child: load the GGUF file (fp32) with `runtime`, then one forward token."""
    import torch

    # Baseline: each runtime imported and one tiny model built on the meta device (the first
    # build imports ~70 MB of torch internals, a cost of any model, not of reading GGUF).
    if runtime == "ours":
        from llama.checkpoints import load
        from llama.checkpoints.common import build_on_meta
        from llama.config import ModelArgs

        build_on_meta(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=8, multiple_of=8))
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        tiny = transformers.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, vocab_size=8)
        with torch.device("meta"):
            transformers.LlamaForCausalLM(tiny)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if runtime == "ours":
        model = load(path, device="cpu", dtype=torch.float32, max_seq_len=256,
                     progress=False).model
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(torch.tensor([[1]]))
    n_params = sum(p.numel() for p in model.parameters())
    return {"baseline": base, "peak_load": peak_load, "load_s": load_s,
            "peak_forward": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fp32_bytes": 4 * n_params}


def gguf_main(path: Path) -> None:
    """Ours against transformers on one GGUF file: load seconds and peak RSS, as ratios."""
    r = {rt: json.loads(run_child("--measure-gguf", str(path), "--runtime", rt))
         for rt in ("ours", "transformers")}
    size = r["ours"]["fp32_bytes"]
    print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB on disk, "
          f"{size / 2**20:.0f} MiB dequantised to fp32 (ours)")
    print("| runtime | load s | peak RSS after load MiB | (peak - baseline) / fp32 model "
          "| peak RSS after 1 token MiB |")
    print("|---|---|---|---|---|")
    for rt, x in r.items():
        added = (x["peak_load"] - x["baseline"]) / size
        print(f"| {rt} | {x['load_s']:.2f} | {x['peak_load'] / 2**20:.0f} | {added:.2f}x | "
              f"{x['peak_forward'] / 2**20:.0f} |")
    o, t = r["ours"], r["transformers"]
    print(f"ours / transformers: load time {o['load_s'] / t['load_s']:.2f}x, peak RSS added "
          f"by loading {(o['peak_load'] - o['baseline']) / (t['peak_load'] - t['baseline']):.2f}x")


def run_child(*flags: str) -> str:
    """Run this script with `flags` in a fresh interpreter; its last stdout line."""
    out = subprocess.run([sys.executable, __file__, *flags], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1]


def write_main(preset: str, root: Path) -> None:
    from llama.config import PRESETS

    args = PRESETS[preset]
    t0 = time.perf_counter()
    paths = write_checkpoints(args, root)
    print(f"wrote {preset} ({args.n_params() / 1e9:.2f} B params) bf16 in "
          f"{time.perf_counter() - t0:.0f} s under {root}")
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def report(preset: str, size: int, name: str, eight_bit: bool, r: dict[str, float]) -> str:
    """One markdown row; ratios are (peak - the interpreter's baseline) / checkpoint bytes."""
    mode = "8-bit" if eight_bit else "bf16"

    def peak(key: str) -> str:
        return f"{r[key] / GIB:.2f} | {(r[key] - r['baseline']) / size:.2f}x"

    return (f"| {preset} | {name} | {mode} | {size / GIB:.2f} | {r['baseline'] / GIB:.2f} | "
            f"{peak('peak_load')} | {r['load_s']:.1f} | {peak('peak_forward')} | "
            f"{r['forward_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama2-7b", help="a name in llama.config.PRESETS")
    parser.add_argument("--root", type=Path, default=None, help="where to write (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--8bit", dest="eight_bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help="a GGUF file: ours against transformers")
    parser.add_argument("--measure-gguf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.gguf:
        return gguf_main(a.gguf.resolve())
    if a.measure_gguf:
        return print(json.dumps(measure_gguf(a.measure_gguf, a.runtime)))
    if a.write:
        return write_main(a.preset, a.write)
    if a.measure:
        return print(json.dumps(measure(a.measure, a.eight_bit)))
    root = Path(tempfile.mkdtemp(prefix="load_memory_", dir=a.root))
    try:
        paths = json.loads(run_child("--preset", a.preset, "--write", str(root)))
        print(f"{a.preset}: checkpoints written under {root}", flush=True)
        print("| preset | layout | mode | ckpt GiB | baseline RSS GiB | peak RSS after load GiB "
              "| (peak - baseline) / ckpt | load s | peak RSS after 1 token GiB "
              "| (peak - baseline) / ckpt | 1st token s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, path in paths.items():
            for eight_bit in (False, True):
                flags = ["--measure", path] + (["--8bit"] if eight_bit else [])
                result = json.loads(run_child(*flags))
                print(report(a.preset, dir_bytes(Path(path)), name, eight_bit, result),
                      flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

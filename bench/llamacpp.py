"""Ours against llama.cpp (through llama-cpp-python) at the same weight precision.

`bench/decode.py --peer llamacpp` runs this instead of the transformers comparison. For each
preset the bench's random checkpoint (bench/decode_runs.write_hf_checkpoint) is read once by
our loader and written again as GGUF F32, F16 and Q8_0 (llama/checkpoints/gguf_writer.py, with
the preset's SentencePiece vocabulary, so llama.cpp loads it); SmolLM2 is its real GGUF file,
dequantised by our loader and written the same way, its byte-level BPE vocabulary copied from
the file's metadata. Then, interleaved round by round on the same thread count:

    ours fp32  <->  llama.cpp F32
    ours bf16  <->  llama.cpp F16      (16-bit weights each)
    ours int8  <->  llama.cpp Q8_0     (llama/int8.py: per-row scales; Q8_0: per 32 weights)

llama.cpp's side: `Llama.eval` for the prompt and for each new token, greedy from
`llama_get_logits_ith(ctx, -1)` (in 0.3.36 `Llama.scores` is filled only with
logits_all=True), timed as ours: prefill = eval(prompt); TTFT = reset, eval(prompt), argmax;
decode tok/s over the tokens after the first. llama-cpp-python is an optional bench dependency
(it builds llama.cpp from source: 10-25 min on 2 cores; never in CI); without it this says how
to install it and benchmarks nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import BenchPreset, rss_mb
from bench.decode_runs import Ours, Runtime

INSTALL_HINT = (
    "llama-cpp-python is not installed: the llama.cpp columns need it. Install with\n"
    '  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF '
    '-DLLAMA_BUILD_TOOLS=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \\\n'
    "  pip install llama-cpp-python==0.3.36   (builds llama.cpp: 10-25 min on 2 cores)"
)
# (ours `weights`, llama.cpp GGUF type): the same precision on both sides
PAIRS = (("fp32", "F32"), ("bf16", "F16"), ("int8", "Q8_0"))
SMOLLM2 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "smollm2"


def available() -> str | None:
    """None when llama_cpp imports, else the install hint."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def write_ggufs(
    ckpt: Path, preset: BenchPreset, workdir: Path, qtypes: list[str]
) -> dict[str, Path]:
    """{GGUF type: file} of the weights at `ckpt` (reused when already written)."""
    from llama.checkpoints import load
    from llama.checkpoints.gguf_writer import write_gguf

    out = {q: workdir / f"{preset.name}-{q}.gguf" for q in qtypes}
    if all(p.is_file() for p in out.values()):
        return out
    loaded = load(ckpt, device="cpu", dtype=torch.float32, progress=False, fuse=False)
    state, tied = loaded.model.state_dict(), loaded.model.output_tied
    metadata = _gguf_tokenizer_metadata(loaded)
    for qtype, path in out.items():
        t0 = time.perf_counter()
        write_gguf(
            state,
            loaded.model.args,
            path,
            qtype,
            tokenizer=None if metadata else preset.tokenizer,
            tied=tied,
            metadata=metadata,
        )
        print(f"  wrote {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _gguf_tokenizer_metadata(loaded: Any) -> dict[str, Any] | None:
    """A GGUF checkpoint's own metadata (its vocabulary included), else None."""
    meta = getattr(loaded, "metadata", None)
    if not meta:
        return None
    return {
        k: v for k, v in meta.items() if not k.startswith("general.") or k == "general.architecture"
    }


class LlamaCpp(Runtime):
    """llama.cpp through llama-cpp-python on one GGUF file."""

    def __init__(self, gguf: Path, qtype: str, threads: int, a: argparse.Namespace) -> None:
        super().__init__()
        import llama_cpp

        self.name = f"llama.cpp {qtype}"
        self._lib = llama_cpp
        before = rss_mb()
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=a.prompt_len + a.new_tokens + 8,
            n_batch=a.prompt_len,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self._loaded(
            before,
            _prompt(self.n_vocab, a.prompt_len),
            _prompt(self.n_vocab, a.ttft_prompt),
            a.new_tokens,
        )

    def _argmax(self) -> int:
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
        )
        return int(logits.argmax())

    def _generate(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        """(TTFT s, decode tokens/s after the first, tokens)."""
        t0 = time.perf_counter()
        self.llm.reset()
        self.llm.eval(prompt)
        tokens = [self._argmax()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval(tokens[-1:])
            tokens.append(self._argmax())
        t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1) if n > 1 else 0.0, tokens

    def _round(self, prompt: list[int], short: list[int], n: int, record: bool) -> None:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t0
        ttft, rate, tokens = self._generate(prompt, n)
        ttft_short, _, _ = self._generate(short, 1)
        if record:
            self.prefill.append(len(prompt) / prefill)
            self.decode.append(rate)
            self.ttft.append(ttft)
            self.ttft_short.append(ttft_short)
            self.tokens = tokens


def _prompt(vocab: int, n: int) -> list[int]:
    from bench.decode_runs import prompt_ids

    return prompt_ids(vocab, n)


def runners(
    ckpt: Path, preset: BenchPreset, threads: int, a: argparse.Namespace
) -> list[tuple[Runtime, Runtime]]:
    """(ours, llama.cpp) per precision, each loaded and warmed up; with --compile (presets
    under --compile-max-params) also (ours compiled, the same llama.cpp runtime)."""
    from bench.decode import ours_variants

    wanted = [(w, q) for w, q in PAIRS if w in a.precisions.split(",")]
    files = write_ggufs(ckpt, preset, a.workdir, [q for _, q in wanted])
    cpu = torch.device("cpu")
    pairs = []
    for weights, qtype in wanted:
        peer = LlamaCpp(files[qtype], qtype, threads, a)
        for compiled in ours_variants(a, preset, cpu):
            ours = Ours(ckpt, preset, cpu, torch.float32, a, compiled, weights=weights)
            pairs.append((ours, peer))
    return pairs

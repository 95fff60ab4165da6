"""The two runtimes under test (ours, transformers) and the report for bench/decode.py."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BenchPreset,
    median,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    sync,
)
from llama.config import ModelArgs


# Checkpoint and prompt -------------------------------------------------------------------
def hf_config(args: ModelArgs) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def write_hf_checkpoint(args: ModelArgs, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Random weights saved by transformers' save_pretrained (reused when the shape matches).

    Initialised and saved in `dtype` (a 7B model in bf16 is 13.5 GB, not 27)."""
    from transformers import LlamaForCausalLM

    config = hf_config(args)
    stamp = out / "bench-shape.json"
    shape = json.dumps(args.to_params_json(), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == shape and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # transformers' own initialisation (normal, std 0.02)
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    del model
    stamp.write_text(shape)
    print(f"  wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """n ids drawn uniformly from [3, vocab): no BOS/EOS/pad in the middle of the prompt."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


class NoEos:
    """A tokenizer that never ends a reply: the benchmark always decodes new_tokens tokens
    (what transformers' min_new_tokens does on its side)."""

    eos_id = -1
    stop_ids: frozenset[int] = frozenset()

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


# Runtimes --------------------------------------------------------------------------------
class Runtime:
    """Timings of one runtime across rounds: rates in tokens/s, times in seconds."""

    name = "?"

    def __init__(self) -> None:
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.ttft: list[float] = []
        self.ttft_short: list[float] = []
        self.tokens: list[int] = []
        self.resident_mb = 0.0
        self.transient_mb = 0.0
        self.error: str | None = None
        self.variant = ""
        self.compile_s = 0.0

    def summary(self) -> str:
        if self.error:
            return f"{self.name}: {self.error}"
        if not self.decode:
            return f"{self.name}: warm"
        return (
            f"{self.name}{self.variant}: prefill {self.prefill[-1]:.0f}, "
            f"decode {self.decode[-1]:.1f} tok/s, ttft {self.ttft[-1] * 1e3:.0f} ms"
        )

    def round(self, prompt: list[int], short: list[int], n: int, record: bool) -> None:
        if self.error:
            return
        start = rss_mb()
        reset_peak_rss()
        self._round(prompt, short, n, record)
        self.transient_mb = max(self.transient_mb, peak_rss_mb() - start)

    def _round(self, prompt: list[int], short: list[int], n: int, record: bool) -> None:
        raise NotImplementedError

    def _loaded(self, rss_before: float, prompt: list[int], short: list[int], n: int) -> None:
        """Warm up once (touching every weight), then note the resident memory it added."""
        self._round(prompt, short, n, record=False)
        self.resident_mb = rss_mb() - rss_before


class Ours(Runtime):
    """Our runtime as the product runs it; `compiled` adds llama.runtime_opts.compile_decode."""

    def __init__(
        self,
        ckpt: Path,
        preset: BenchPreset,
        device: torch.device,
        dtype: torch.dtype,
        a: argparse.Namespace,
        compiled: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.name = "ours, compiled" if compiled else "ours"
        if weights is not None:  # load(weights=...): bf16 sets the dtype itself
            self.name = f"ours {weights}" + (", compiled" if compiled else "")
            dtype = dtype if weights in ("fp32", "int8") else None
        from llama.checkpoints import load
        from llama.runtime_opts import compile_decode
        from llama.tokenizer import load_tokenizer

        before = rss_mb()
        max_len = min(preset.args.max_seq_len, a.prompt_len + a.new_tokens)
        loaded = load(
            ckpt,
            device=device,
            dtype=dtype,
            load_in_8bit=a.load_in_8bit,
            max_seq_len=max_len,
            tokenizer_path=preset.tokenizer,
            progress=False,
            fuse=not a.no_fuse,  # prepare_for_decode: fused projections, output layout
            weights=weights,
        )
        self.model, self.device = loaded.model, device
        fused = self.model.layers[0].attention.wqkv is not None
        self.variant = "" if fused else " (unfused)"
        self.tokenizer = NoEos(load_tokenizer(preset.tokenizer))
        self.model.setup_caches(1)
        if compiled:
            # one compiled step per runtime and span: a run of presets x precisions passes
            # dynamo's default of 8 graphs per function, after which it silently runs eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            t0 = time.perf_counter()
            compile_decode(self.model)
            self.compile_s = time.perf_counter() - t0
            print(f"  compile_decode: {self.compile_s:.0f} s", flush=True)
        self._loaded(
            before,
            prompt_ids(preset.args.vocab_size, a.prompt_len),
            prompt_ids(preset.args.vocab_size, a.ttft_prompt),
            a.new_tokens,
        )

    @torch.inference_mode()
    def _prefill(self, prompt: list[int]) -> float:
        tokens = torch.tensor([prompt], device=self.device)
        sync(self.device)
        t0 = time.perf_counter()
        self.model(tokens, input_pos=torch.arange(len(prompt)), last_only=True)
        sync(self.device)
        return time.perf_counter() - t0

    def _generate(self, prompt: list[int], n: int) -> tuple[float, list[Any]]:
        from llama.generate import generate
        from llama.sampling import SamplingParams

        params = SamplingParams(temperature=0.0, max_new_tokens=n)
        t0 = time.perf_counter()
        it = generate(self.model, self.tokenizer, prompt, params, n_top=0)
        first = next(it)
        ttft = time.perf_counter() - t0
        return ttft, [first, *it]

    def _round(self, prompt: list[int], short: list[int], n: int, record: bool) -> None:
        prefill = self._prefill(prompt)
        ttft, steps = self._generate(prompt, n)
        ttft_short, _ = self._generate(short, 1)
        if record:
            self.prefill.append(len(prompt) / prefill)
            span = steps[-1].elapsed_s - steps[0].elapsed_s
            self.decode.append((len(steps) - 1) / span)
            self.ttft.append(ttft)
            self.ttft_short.append(ttft_short)
            self.tokens = [s.token_id for s in steps]


class Theirs(Runtime):
    name = "transformers"

    def __init__(
        self,
        ckpt: Path,
        preset: BenchPreset,
        device: torch.device,
        dtype: torch.dtype,
        a: argparse.Namespace,
    ) -> None:
        super().__init__()
        import transformers

        transformers.logging.set_verbosity_error()
        before = rss_mb()
        kw: dict[str, Any] = {"dtype": dtype}
        if a.load_in_8bit:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
            if device.type == "cuda":  # on CPU transformers needs accelerate for this
                kw["device_map"] = {"": device}
        if preset.gguf is not None:  # transformers dequantises it to `dtype` as we do
            ckpt, kw["gguf_file"] = ckpt.parent, ckpt.name
        try:
            model = transformers.LlamaForCausalLM.from_pretrained(ckpt, **kw)
        except Exception as exc:  # report it in the table, keep benchmarking ours
            self.error = f"cannot load ({type(exc).__name__}: {str(exc)[:120]})"
            return
        self.model = (model if a.load_in_8bit else model.to(device)).eval()
        self.device = device
        caches = ["dynamic"] + ([] if a.skip_hf_static else ["static"])
        self.by_cache = {c: {"decode": [], "ttft": [], "ttft_short": []} for c in caches}
        self._loaded(
            before,
            prompt_ids(preset.args.vocab_size, a.prompt_len),
            prompt_ids(preset.args.vocab_size, a.ttft_prompt),
            a.new_tokens,
        )

    @torch.inference_mode()
    def _timed_generate(self, ids: list[int], n: int, cache: str) -> tuple[float, list[int]]:
        x = torch.tensor([ids], device=self.device)
        kw: dict[str, Any] = dict(
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
        if cache == "static":
            kw["cache_implementation"] = "static"
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(x, **kw)
        sync(self.device)
        return time.perf_counter() - t0, out[0, len(ids) :].tolist()

    @torch.inference_mode()
    def _prefill(self, prompt: list[int]) -> float:
        x = torch.tensor([prompt], device=self.device)
        sync(self.device)
        t0 = time.perf_counter()
        self.model(x, use_cache=True, logits_to_keep=1)
        sync(self.device)
        return time.perf_counter() - t0

    def _round(self, prompt: list[int], short: list[int], n: int, record: bool) -> None:
        prefill = self._prefill(prompt)
        for cache, rec in self.by_cache.items():
            t1, _ = self._timed_generate(prompt, 1, cache)
            tn, tokens = self._timed_generate(prompt, n, cache)
            t_short, _ = self._timed_generate(short, 1, cache)
            if record:
                rec["decode"].append((n - 1) / (tn - t1))
                rec["ttft"].append(t1)
                rec["ttft_short"].append(t_short)
                self.tokens = tokens
        if record:
            self.prefill.append(len(prompt) / prefill)
            self._pick_best()

    def _pick_best(self) -> None:
        """Report the cache with the better median decode rate (its TTFTs too)."""
        best = max(self.by_cache, key=lambda c: median(self.by_cache[c]["decode"]))
        self.variant = f" ({best} cache)"
        for key in ("decode", "ttft", "ttft_short"):
            setattr(self, key, list(self.by_cache[best][key]))

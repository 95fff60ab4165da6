"""Bits per byte of the shipped model and of stories260K on held-out TinyStories, side by side.

Protocol (the same for every model): the TinyStories V1 validation sample is split into its
blank-line-separated paragraphs (story boundaries are not recoverable there, see
../shared/data/corpus/PROVENANCE.md). Each paragraph is encoded with the model's own tokenizer
as BOS + tokens and scored in windows of the model's max_seq_len (a longer paragraph continues
in the next window; no token is scored twice). bpb = total NLL of the paragraphs' tokens in
bits / total UTF-8 bytes of the paragraphs. BOS itself and the paragraph separators are not
scored. Tokenizers differ, so the comparison is per byte, never per token.

Usage: python bench/quality.py [--ours assets/tinychat] [--teacher PATH] [--limit N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.assets import SHIPPED_MODEL_DIR  # noqa: E402
from llama.checkpoints import load  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizer import Tokenizer, open_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
VALID = SHARED / "corpus" / "tinystories" / "tinystories_v1_valid_sample.txt"
TEACHER = SHARED / "stories260K" / "stories260K.bin"


@dataclass
class Score:
    nll_bits: float
    n_bytes: int
    n_tokens: int

    @property
    def bpb(self) -> float:
        return self.nll_bits / self.n_bytes

    @property
    def bits_per_token(self) -> float:
        return self.nll_bits / self.n_tokens


def paragraphs(path: Path = VALID) -> list[str]:
    """The blank-line-separated paragraphs of `path`, stripped, non-empty."""
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Split BOS+tokens into windows of at most size+1 ids overlapping by one id.

    Window k covers ids[k*size : k*size + size + 1]: its first `size` ids are inputs, the
    rest of it targets, so every token after BOS is scored exactly once.
    """
    return [ids[s : s + size + 1] for s in range(0, len(ids) - 1, size)]


@torch.no_grad()
def score(model: Transformer, tok: Tokenizer, texts: list[str], batch_size: int = 32) -> Score:
    """Total NLL (bits) of `texts` under `model`, per the protocol in the module docstring."""
    size = model.args.max_seq_len
    chunks = [w for t in texts for w in windows(tok.encode(t, bos=True), size)]
    chunks.sort(key=len)
    nll = 0.0
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        width = max(len(c) for c in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width - 1), -100, dtype=torch.long)
        for b, c in enumerate(batch):
            x[b, : len(c)] = torch.tensor(c)
            y[b, : len(c) - 1] = torch.tensor(c[1:])
        logits = model(x[:, :-1])  # (B, T, V); right padding never affects earlier positions
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
    n_tokens = sum(len(c) - 1 for c in chunks)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return Score(nll / math.log(2), n_bytes, n_tokens)


def evaluate(path: Path, texts: list[str], label: str) -> Score:
    loaded = load(path, device="cpu", dtype=torch.float32, progress=False)
    tok = open_tokenizer(loaded)
    t0 = time.time()
    s = score(loaded.model, tok, texts)
    print(f"{label:<12} {loaded.model.args.n_params(tied=True) / 1e6:>6.2f}M  vocab "
          f"{tok.vocab_size:>5}  bytes/token {s.n_bytes / s.n_tokens:5.2f}  bits/token "
          f"{s.bits_per_token:6.3f}  bpb {s.bpb:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", type=Path, default=SHIPPED_MODEL_DIR)
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--limit", type=int, default=0, help="first N paragraphs only (0: all)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    texts = paragraphs()
    texts = texts[: a.limit] if a.limit else texts
    print(f"{VALID.name}: {len(texts)} paragraphs, "
          f"{sum(len(t.encode()) for t in texts):,} bytes")
    ours = evaluate(a.ours, texts, "ours")
    ref = evaluate(a.teacher, texts, "stories260K")
    verdict = "meets" if ours.bpb <= ref.bpb else "MISSES"
    print(f"ours {ours.bpb:.4f} bpb vs stories260K {ref.bpb:.4f} bpb: {verdict} the target "
          "(ours <= stories260K)")


if __name__ == "__main__":
    main()

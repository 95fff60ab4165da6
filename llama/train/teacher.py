"""Sample TinyStories-style text from a small teacher model (stories260K), many stories at once.

This is bulk data generation, not the chat path: every sequence in a batch starts from BOS at
position 0 and advances one position per step through the KV cache, so one forward call serves
B stories. A story ends when the teacher emits BOS or EOS (llama2.c models were trained with
BOS before each story and no EOS); stories that reach `max_len` without ending are dropped, so
only complete stories come back.

CLI: `python -m llama.train.teacher --teacher ../shared/data/stories260K/stories260K.bin
--out /work/runs/tinychat/data/synthetic.txt --stories 20000` writes stories separated by
`<|endoftext|>` lines (the corpus format read by llama/train/data.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from llama.checkpoints import load
from llama.model import Transformer
from llama.tokenizer import Tokenizer, open_tokenizer

DOC_SEPARATOR = "<|endoftext|>"


@torch.inference_mode()
def sample_batch(
    model: Transformer,
    batch_size: int,
    bos_id: int,
    stop_ids: tuple[int, ...],
    max_len: int,
    temperature: float,
    generator: torch.Generator,
) -> list[list[int]]:
    """Sample `batch_size` sequences from BOS; return the ids of those that ended (stop id seen
    within `max_len` positions), without BOS and the stop id. Plain temperature sampling."""
    model.setup_caches(batch_size)
    device = model.tok_embeddings.weight.device
    token = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    rows: list[Tensor] = []
    ended = torch.full((batch_size,), -1, dtype=torch.long)
    stops = torch.tensor(stop_ids, device=device)
    for pos in range(max_len - 1):
        logits = model(token, torch.tensor([pos], device=device))[:, -1]  # (B, V)
        probs = torch.softmax(logits / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        rows.append(token[:, 0].cpu())
        is_stop = torch.isin(token[:, 0], stops).cpu() & (ended < 0)
        ended[is_stop] = pos
        if bool((ended >= 0).all()):
            break
    ids = torch.stack(rows, dim=1)  # (B, steps)
    return [ids[b, : int(ended[b])].tolist() for b in range(batch_size) if ended[b] >= 0]


def clean_story(text: str) -> str:
    """One paragraph per line, no blank lines, no surrounding whitespace."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def sample_stories(
    model: Transformer,
    tokenizer: Tokenizer,
    count: int,
    batch_size: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    max_len: int | None = None,
) -> Iterator[str]:
    """Yield `count` complete stories (cleaned text) sampled from `model` at `temperature`."""
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    max_len = max_len or model.args.max_seq_len
    stops = (tokenizer.bos_id, tokenizer.eos_id)
    made = 0
    while made < count:
        for ids in sample_batch(model, batch_size, tokenizer.bos_id, stops, max_len,
                                temperature, generator):
            story = clean_story(tokenizer.decode(ids))
            if story and made < count:
                made += 1
                yield story


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="checkpoint path (e.g. stories260K.bin)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stories", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = load(a.teacher, device="cpu", dtype=torch.float32, progress=False)
    if loaded.tokenizer_path is None:
        raise SystemExit(f"{a.teacher}: no tokenizer found beside the teacher")
    tok = open_tokenizer(loaded)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t0, nbytes = time.time(), 0
    with a.out.open("w", encoding="utf-8") as f:
        for i, story in enumerate(sample_stories(loaded.model, tok, a.stories, a.batch_size,
                                                 a.temperature, a.seed)):
            f.write(story + "\n" + DOC_SEPARATOR + "\n")
            nbytes += len(story.encode())
            if (i + 1) % a.batch_size == 0:
                f.flush()
                print(f"{i + 1} stories, {nbytes / 1e6:.1f} MB, {time.time() - t0:.0f} s",
                      flush=True)


if __name__ == "__main__":
    main()

"""Greedy and sampled outputs of the shipped model, as markdown for its MODEL_CARD.md.

Raw completion of "Once upon a time" and three chat prompts (Llama-2-chat template via
llama/chat.py), each greedy and sampled (temperature 0.8, top-p 0.9, seed 0), through the same
generate() the app uses. Usage: python bench/samples.py [--model assets/tinychat]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.assets import SHIPPED_MODEL_DIR  # noqa: E402
from llama.chat import Prompt, encode_completion, encode_dialog  # noqa: E402
from llama.checkpoints import load  # noqa: E402
from llama.generate import generate_text  # noqa: E402
from llama.sampling import SamplingParams  # noqa: E402
from llama.tokenizer import Tokenizer, open_tokenizer  # noqa: E402

CHAT_PROMPTS = (
    "Write a story about a dog named Max.",
    "Tell me a story with the words ball, happy and park.",
    "Write a story about a little girl who finds a shiny stone.",
)
SETTINGS = (
    ("greedy", SamplingParams(temperature=0.0, max_new_tokens=200)),
    ("sampled (T=0.8, top-p 0.9, seed 0)",
     SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_new_tokens=200)),
)


def prompts(tok: Tokenizer) -> list[tuple[str, Prompt]]:
    items = [("raw completion: `Once upon a time`", encode_completion(tok, "Once upon a time"))]
    for text in CHAT_PROMPTS:
        items.append((f"chat: `{text}`", encode_dialog(tok, [{"role": "user", "content": text}])))
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load(a.model, device="cpu", dtype=torch.float32, progress=False)
    tok = open_tokenizer(loaded)
    for title, prompt in prompts(tok):
        print(f"### {title}\n")
        for label, params in SETTINGS:
            text, reason = generate_text(loaded.model, tok, prompt, params=params)
            prefix = "Once upon a time" if title.startswith("raw") else ""
            quoted = "\n".join("> " + line for line in (prefix + text).strip().splitlines())
            print(f"**{label}** (finish: {reason})\n\n{quoted}\n")


if __name__ == "__main__":
    main()

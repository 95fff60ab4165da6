"""Does the shipped model write about the character the user asked for?

For "Write a story about a <animal> named <Name>." over 10 (animal, name) pairs x 3 seeds,
sent through the real chat path (llama/chat.py encode_dialog -> llama/generate.py generate,
temperature 0.8, top-p 0.9), count the replies that use the requested name. The names are NOT
among the names substituted into the training stories (llama/train/data.py NAMES; HELD_OUT_NAMES
lists them and invent_name never makes them), so the model must
copy the name from the prompt (`--seen` repeats the test with names from that list, for
comparison; the target is about the unseen names). Also prints the decode speed seen
(generated tokens / second, prefill included). Target: rate >= 0.8.

Usage: python bench/name_rate.py [--model assets/tinychat] [--seeds 3] [--show]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.assets import SHIPPED_MODEL_DIR  # noqa: E402
from llama.chat import encode_dialog  # noqa: E402
from llama.checkpoints import load  # noqa: E402
from llama.generate import generate  # noqa: E402
from llama.sampling import SamplingParams  # noqa: E402
from llama.tokenizer import open_tokenizer  # noqa: E402
from llama.train.data import HELD_OUT_NAMES, NAMES  # noqa: E402

PAIRS = (
    ("cat", "Oscar"), ("dog", "Penny"), ("bird", "Rocky"), ("rabbit", "Ginger"),
    ("fox", "Marco"), ("bear", "Hattie"), ("frog", "Felipe"), ("duck", "Nadia"),
    ("lion", "Tobias"), ("mouse", "Greta"),
)
# --seen: the same animals with names that ARE in the training substitution list (NAMES).
SEEN_NAMES = ("Clara", "Hugo", "Kofi", "Lena", "Nico", "Priya", "Theo", "Wren", "Yara", "Zuri")


def uses_name(reply: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", reply) is not None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--show", action="store_true", help="print every reply")
    p.add_argument("--seen", action="store_true", help="use names from the training list")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    assert {n for _, n in PAIRS} == HELD_OUT_NAMES, "llama/train/data.py must never invent these"
    assert not HELD_OUT_NAMES & set(NAMES), "test names must be unseen in training"
    assert set(SEEN_NAMES) <= set(NAMES)
    pairs = [(a_, n) for (a_, _), n in zip(PAIRS, SEEN_NAMES, strict=True)] if a.seen else PAIRS
    loaded = load(a.model, device="cpu", dtype=torch.float32, progress=False)
    tok = open_tokenizer(loaded)
    hits = total = n_tokens = 0
    elapsed = 0.0
    for animal, name in pairs:
        prompt = encode_dialog(tok, [{"role": "user", "content":
                                      f"Write a story about a {animal} named {name}."}])
        for seed in range(a.seeds):
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=seed,
                                    max_new_tokens=a.max_new_tokens)
            t0 = time.perf_counter()
            steps = list(generate(loaded.model, tok, prompt, params))
            elapsed += time.perf_counter() - t0
            n_tokens += len(steps)
            reply = "".join(s.text for s in steps)
            ok = uses_name(reply, name)
            hits, total = hits + ok, total + 1
            if a.show:
                print(f"--- {animal} {name} seed {seed}: {'OK' if ok else 'MISSING'}\n{reply}")
    kind = "seen" if a.seen else "unseen"
    print(f"name rate ({kind} names): {hits}/{total} = {hits / total:.2f} (target >= 0.80); decode "
          f"{n_tokens / elapsed:.0f} tokens/s over {n_tokens} tokens "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

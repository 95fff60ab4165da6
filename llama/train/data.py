"""Training data for the shipped model: corpus reading, chat examples, token streams, batches.

Corpus files are UTF-8 text with `<|endoftext|>` lines between documents and one paragraph per
line (../shared/data/corpus/PROVENANCE.md). A training stream is one long array of token ids:
documents, each `BOS + text + EOS` (plain) or the Llama-2-chat encoding of
`[user instruction, assistant story]` built with llama/chat.py's `encode_dialog`, so the template
is exactly the one the app sends. Batches are windows of that array chosen by a seeded
permutation, so the batch of step s is a pure function of (stream, seed, s): resuming a run
only needs the step number.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llama.chat import encode_dialog
from llama.tokenizer import Tokenizer

DOC_SEPARATOR = "<|endoftext|>"

# Substituted for story characters' names in chat examples so that the model learns to take
# the name from the instruction (names, not the story, carry it). bench/name_rate.py tests
# with names that are NOT in this list.
_NAMES_TEXT = (
    "Ada Alex Alice Amir Amy Anna Arlo Aria Asha Ava Bea Bella Ben Bo Bruno Cara Carlos "
    "Chloe Clara Coco Daisy Dan Dara Diego Dora Duke Eli Ella Elsa Emil Emma Eva Felix Finn "
    "Fiona Gabe Gina Grace Gus Hana Hank Hazel Hugo Ian Ida Ines Iris Ivan Jack Jade Jake "
    "Jay Jin Joe Jonas Juno Kai Kara Kate Kim Kip Kofi Lana Lars Leo Lena Liam Lila Lola "
    "Lucy Luis Luna Mae Maya Max Mia Milo Mina Molly Nate Nell Nia Nico Nina Noah Nora Olga "
    "Omar Otto Owen Pablo Pam Paz Pip Priya Quinn Raj Remy Rex Rita Rosa Rose Ruby Rudy Sam "
    "Sara Sid Sofia Sol Stan Sue Suki Taro Tess Theo Tia Tim Toby Tom Uma Vera Vik Wes "
    "Willa Yara Yuki Zack Zara Zoe Zuri Abel Bram Cleo Dev Enzo Fern Gwen Hiro Ilse Joss "
    "Kira Lupe Mabel Ned Odin Pia Reza Sage Tove Ugo Vida Wren Xena Yoko Zed Ayla Boris "
    "Cyra Dirk Esme Fritz"

)
NAMES = tuple(_NAMES_TEXT.split())

NAMED = re.compile(r"\b(?:a|an) ((?:[a-z]+ )?([a-z]+)) (?:named|called) ([A-Z][a-z]+)\b")
WORD = re.compile(r"\b[a-z]{4,}\b")
_STOP_TEXT = (
    "that this with they them then there their were what when said very have from into "
    "about your just like some saw could would because back down want wanted went came look "
    "looked day one time once upon little big happy felt asked made make make"

)
STOP_WORDS = frozenset(_STOP_TEXT.split())
SYSTEM_PROMPTS = (
    "You are a helpful assistant who writes short, simple stories for young children.",
    "You tell kind stories for kids.",
    "You are a friendly storyteller.",
)


def read_documents(path: str | Path, max_bytes: int | None = None) -> list[str]:
    """Documents of a corpus file (text between `<|endoftext|>` lines, stripped, non-empty).

    A file without separators (the TinyStories validation sample) is one document per blank-
    line-separated paragraph. `max_bytes` reads only the file's first bytes (whole docs only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found")
    with path.open("rb") as f:
        raw = f.read(max_bytes) if max_bytes else f.read()
    text = raw.decode("utf-8", errors="ignore")
    if DOC_SEPARATOR in text:
        parts = text.split(DOC_SEPARATOR)
        if max_bytes and len(parts) > 1:
            parts = parts[:-1]  # drop the possibly cut-off last document
    else:
        parts = re.split(r"\n\s*\n", text)
    docs = ["\n".join(ln.strip() for ln in p.strip().splitlines() if ln.strip()) for p in parts]
    return [d for d in docs if d]


def chunk_documents(docs: Sequence[str], max_bytes: int) -> list[str]:
    """Cut long documents (whole books) into runs of whole paragraphs of <= max_bytes each
    (a single longer paragraph stays whole)."""
    out: list[str] = []
    for doc in docs:
        chunk: list[str] = []
        size = 0
        for para in doc.split("\n"):
            n = len(para.encode()) + 1
            if chunk and size + n > max_bytes:
                out.append("\n".join(chunk))
                chunk, size = [], 0
            chunk.append(para)
            size += n
        if chunk:
            out.append("\n".join(chunk))
    return out


def split_holdout(docs: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) split of `docs`, a seeded random `fraction` held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(len(docs) * fraction))
    held = set(order[:n_hold])
    return (
        [d for i, d in enumerate(docs) if i not in held],
        [d for i, d in enumerate(docs) if i in held],
    )


def rename(story: str, old: str, new: str) -> str:
    """Replace the whole word `old` by `new` everywhere in `story`."""
    return re.sub(rf"\b{re.escape(old)}\b", new, story)


ONSETS = ("b", "br", "c", "ch", "cl", "d", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n",
          "p", "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "y", "ia", "ei", "ee", "oo", "ay")
CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "t", "ck", "x", "nd", "tt")
# The names bench/name_rate.py asks for: never substituted into training text, so a model that
# writes them copied them from the instruction.
_HELD_OUT_TEXT = "Oscar Penny Rocky Ginger Marco Hattie Felipe Nadia Tobias Greta"
HELD_OUT_NAMES = frozenset(_HELD_OUT_TEXT.split())


def invent_name(rng: random.Random) -> str:
    """A pronounceable made-up name of 1-3 syllables ("Tobin", "Marela", "Ostrick"): not in
    NAMES nor HELD_OUT_NAMES, so the model can only write it by copying it from the
    instruction. A name may start with a vowel, as real ones do."""
    while True:
        n = rng.choice((1, 2, 2, 3))
        syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n)]
        if rng.random() < 0.2:  # vowel-initial: drop the first onset
            syllables[0] = syllables[0].lstrip("bcdfghjklmnprstvwxz") or syllables[0]
        name = ("".join(syllables) + rng.choice(CODAS)).capitalize()
        if 3 <= len(name) <= 8 and name not in NAMES and name not in HELD_OUT_NAMES:
            return name


_CONSONANT_TEXT = (
    "b c d f g h j k l m n p r s t v w z bl br ch ck cl cr dr fl fr gl gr ld ll mm nd ng nk nn "
    "ph pl pp pr rl rr sc sh sk sl sm sn sp ss st sw th tr tt"
)
_VOWEL_TEXT = "a e i o u y ai au ea ee ei ia ie io oa oo ou ue"
CONSONANT_UNITS, VOWEL_UNITS = tuple(_CONSONANT_TEXT.split()), tuple(_VOWEL_TEXT.split())


def letter_name(rng: random.Random) -> str:
    """A made-up name of 2-5 letter groups, consonant and vowel groups alternating, any group
    anywhere ("Scoupp", "Ingeld", "Attie"): no fixed syllable shape for a model to learn, so
    writing it takes copying its pieces from the instruction, whatever they are. Never in
    NAMES nor HELD_OUT_NAMES."""
    while True:
        vowel = rng.random() < 0.3
        units = []
        for _ in range(rng.randint(2, 5)):
            units.append(rng.choice(VOWEL_UNITS if vowel else CONSONANT_UNITS))
            vowel = not vowel
        name = "".join(units).capitalize()
        if 3 <= len(name) <= 8 and name not in NAMES and name not in HELD_OUT_NAMES:
            return name


@dataclass(frozen=True)
class Naming:
    """How chat examples rename a story's hero ("a dog named Max").

    rename: share of such stories renamed; invented: share of new names made up
    (`invent_name`) rather than taken from NAMES; letters: share of made-up names in the
    `letter_name` style. A share of 0 (or a rename of 1) draws no random number, so streams
    built before an option existed are rebuilt byte for byte.
    """

    rename: float = 1.0
    invented: float = 0.0
    letters: float = 0.0


def make_instruction(
    story: str, rng: random.Random, naming: Naming = Naming()
) -> tuple[str, str]:
    """(instruction, story) for a chat example; the story may have its hero renamed.

    "a dog named Max" in the story -> (for `naming.rename` of such stories) a random name from
    NAMES replaces Max throughout and the instruction asks for "a dog named <new name>";
    otherwise the instruction lists three words of the story, or just asks for a story.
    `naming.invented` of the new names are made up instead (`invent_name`), `naming.letters`
    of those in the looser `letter_name` style.
    """
    m = NAMED.search(story)
    # No draw at naming.rename 1: the random stream stays the one phases 1-2 used.
    if m is not None and (naming.rename >= 1.0 or rng.random() < naming.rename):
        noun_phrase, noun, old = m.group(1), m.group(2), m.group(3)
        # No draw at a share of 0 either (older streams rebuild byte for byte).
        invented = naming.invented > 0 and rng.random() < naming.invented
        if not invented:
            new = rng.choice(NAMES)
        elif naming.letters > 0 and rng.random() < naming.letters:
            new = letter_name(rng)
        else:
            new = invent_name(rng)
        story = rename(story, old, new)
        what = noun if rng.random() < 0.7 else noun_phrase
        article = "an" if what[0] in "aeiou" else "a"
        template = rng.choice(
            (
                "Write a story about {a} {what} named {name}.",
                "Write a story about {a} {what} named {name}.",
                "Tell me a story about {a} {what} named {name}.",
                "Can you write a short story about {a} {what} called {name}?",
                "Write a story about {name}, {a} {what}.",
            )
        )
        return template.format(a=article, what=what, name=new), story
    words = sorted({w for w in WORD.findall(story) if w not in STOP_WORDS})
    if len(words) >= 3 and rng.random() < 0.8:
        a, b, c = rng.sample(words, 3)
        return f"Tell me a story with the words {a}, {b} and {c}.", story
    return rng.choice(
        (
            "Tell me a story.",
            "Write a short story.",
            "Tell me a story for kids.",
            "Write a story for a child.",
        )
    ), story


def chat_ids(tok: Tokenizer, instruction: str, answer: str, system: str | None = None) -> list[int]:
    """Ids of one completed Llama-2-chat turn: BOS [INST] instruction [/INST] answer EOS.

    encode_dialog needs a dialog that ends with a user message; the final (empty-answer)
    segment it adds is encoded alone and cut off, so the kept ids are exactly the app's.
    """
    msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    tail = [{"role": "user", "content": "x"}]
    full = encode_dialog(tok, [*msgs, *tail]).ids
    return full[: len(full) - len(encode_dialog(tok, tail).ids)]


def document_ids(
    tok: Tokenizer, doc: str, chat: bool, rng: random.Random, naming: Naming = Naming()
) -> list[int]:
    """One training document: plain BOS + text + EOS, or a chat example made from it."""
    if not chat:
        return tok.encode(doc, bos=True, eos=True)
    instruction, story = make_instruction(doc, rng, naming)
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.2 else None
    return chat_ids(tok, instruction, story, system)


@dataclass(frozen=True)
class Source:
    """Documents drawn for a stream: each epoch uses every doc once, `chat_share` of them
    wrapped as chat examples."""

    docs: Sequence[str]
    epochs: float
    chat_share: float = 0.0


def build_stream(
    tok: Tokenizer, sources: Sequence[Source], seed: int, naming: Naming = Naming()
) -> np.ndarray:
    """Token ids of every source's documents, shuffled together, as one uint16 array.

    Fractional epochs take a seeded random subset of the docs for the last partial epoch.
    """
    rng = random.Random(seed)
    items: list[tuple[str, bool]] = []
    for src in sources:
        full, part = int(src.epochs), src.epochs - int(src.epochs)
        picks = [d for _ in range(full) for d in src.docs]
        picks += rng.sample(list(src.docs), round(part * len(src.docs)))
        items += [(d, rng.random() < src.chat_share) for d in picks]
    rng.shuffle(items)
    ids = [t for doc, chat in items for t in document_ids(tok, doc, chat, rng, naming)]
    if tok.vocab_size > 65535:
        raise ValueError(f"vocab_size {tok.vocab_size} does not fit the uint16 stream")
    return np.asarray(ids, dtype=np.uint16)


class Batches:
    """Windows of `seq_len + 1` tokens from a stream, in a seeded order, batch by batch.

    Batch k holds windows order[k*B : (k+1)*B] (wrapping to a new permutation each pass), so
    `batch(k)` depends only on (stream, seq_len, batch_size, seed, k).
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(
                f"stream of {len(stream)} tokens holds {self.n_windows} windows of "
                f"{seq_len + 1} tokens, fewer than batch_size={batch_size}"
            )
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            }
        return self._orders[epoch]

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        """(inputs, targets), both (B, seq_len) int64, for batch number k >= 0."""
        per_epoch = self.n_windows // self.batch_size
        epoch, i = divmod(k, per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        rows = np.stack(
            [self.stream[j * self.seq_len : j * self.seq_len + self.seq_len + 1] for j in idx]
        ).astype(np.int64)  # (B, seq_len + 1)
        x = torch.from_numpy(rows)
        return x[:, :-1], x[:, 1:]

    def sequential(self, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Every window once in stream order (validation), batch by batch."""
        n = self.n_windows // self.batch_size
        for b in range(n if max_batches is None else min(n, max_batches)):
            rows = np.stack(
                [
                    self.stream[j * self.seq_len : j * self.seq_len + self.seq_len + 1]
                    for j in range(b * self.batch_size, (b + 1) * self.batch_size)
                ]
            ).astype(np.int64)  # (B, seq_len + 1)
            x = torch.from_numpy(rows)
            yield x[:, :-1], x[:, 1:]


def save_stream(stream: np.ndarray, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stream.astype(np.uint16).tofile(path)


def load_stream(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token stream not found (run the data step first)")
    return np.fromfile(path, dtype=np.uint16)

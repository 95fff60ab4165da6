"""Train the shipped model's SentencePiece tokenizer: BPE with byte fallback, Llama-2's ids.

Ids follow Llama-2's tokenizer: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), no pad piece; then the
Llama-2-chat tags as user-defined pieces (one id each, so the chat template costs the small
model few positions), then the 256 byte pieces <0x00>..<0xFF> (byte_fallback: any UTF-8 text
encodes, nothing maps to <unk>), then the learned merges.

CLI: `python -m llama.train.tokenizer --vocab-size 4096 --out assets/tinychat/tokenizer
FILE [FILE ...]` writes tokenizer.model (+ .vocab). Files are corpus text files; documents
separated by `<|endoftext|>` lines are read with llama/train/data.py's reader.
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

CHAT_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


class TokenizerTrainingError(ValueError):
    """The tokenizer trainer got unusable input (no text, impossible vocab size)."""


def train_tokenizer(
    lines: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int,
    max_sentence_length: int = 16384,
    num_threads: int = 2,
) -> Path:
    """Train BPE on `lines` (one sentence per item; may hold newlines) and write `<prefix>.model`.

    Returns the .model path. Deterministic for the same lines and arguments.
    """
    reserved = 3 + len(CHAT_TAGS) + 256
    if vocab_size <= reserved:
        raise TokenizerTrainingError(
            f"vocab_size: expected more than {reserved} (specials, chat tags and 256 byte "
            f"pieces), found {vocab_size}"
        )
    sentences = [s for s in (line.strip() for line in lines) if s]
    if not sentences:
        raise TokenizerTrainingError("no text to train the tokenizer on (all lines are empty)")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=max_sentence_length,
        user_defined_symbols=list(CHAT_TAGS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    path = out_prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    return path


def main(argv: list[str] | None = None) -> None:
    from llama.train.data import Naming, make_instruction, read_documents

    p = argparse.ArgumentParser(description="Train a SentencePiece BPE tokenizer (byte fallback)")
    p.add_argument("files", nargs="+", type=Path, help="corpus text files")
    p.add_argument("--out", required=True, type=Path, help="output prefix (writes PREFIX.model)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-bytes", type=int, default=0, help="read at most this much per file")
    p.add_argument("--rename-share", type=float, default=1.0,
                   help="as llama.train's: changes the instruction lines trained on")
    a = p.parse_args(argv)
    docs = [d for f in a.files for d in read_documents(f, max_bytes=a.max_bytes or None)]
    # The chat instructions the training data will hold, so their words get pieces too.
    rng = random.Random(0)
    lines = docs + [make_instruction(d, rng, Naming(rename=a.rename_share))[0] for d in docs]
    path = train_tokenizer(lines, a.out, a.vocab_size)
    print(f"wrote {path} ({a.vocab_size} pieces, trained on {len(docs)} documents)")


if __name__ == "__main__":
    main()

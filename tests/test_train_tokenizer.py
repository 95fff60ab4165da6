"""The tokenizer trainer: BPE with byte fallback and Llama-2's special ids, on a small text."""

from __future__ import annotations

import random

import pytest

from llama.tokenizer import Tokenizer, load_tokenizer
from llama.train.tokenizer import CHAT_TAGS, TokenizerTrainingError, train_tokenizer

WORDS = ("Once upon a time there was a little girl named Lily She loved to play in the park "
         "with her dog Max One day they found a big red ball and were very happy").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "."
             for _ in range(400)]
    path = train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=380)
    assert path.name == "tokenizer.model"
    return load_tokenizer(path)


def test_llama_special_ids_and_size(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (380, 1, 2, -1)
    assert tok.piece(0) == "<unk>"


def test_learned_merges_compress_the_training_words(tok):
    text = "Once upon a time there was a little girl named Lily."
    assert len(tok.encode(text, bos=False)) < len(text) / 3


def test_byte_fallback_round_trips_unseen_text(tok):
    text = "Zoë's 🦊 jumped — 42 times!\nNew line."
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert 0 not in ids  # nothing fell to <unk>
    assert any(tok.is_byte(i) for i in ids)


def test_chat_tags_are_single_pieces(tok):
    """In template text a tag is one piece; typed (literal) text spells it as plain text."""
    for tag in CHAT_TAGS:
        pieces = [tok.piece(i) for i in tok.encode_parts([(f"x {tag} y", True)])]
        assert tag in pieces, (tag, pieces)
        literal = tok.encode(f"x {tag} y", bos=False)
        assert tag not in [tok.piece(i) for i in literal]
        assert tok.decode(literal) == f"x {tag} y"


def test_bad_inputs_are_named():
    with pytest.raises(TokenizerTrainingError, match="vocab_size"):
        train_tokenizer(["some text"], "/tmp/never", vocab_size=100)
    with pytest.raises(TokenizerTrainingError, match="no text"):
        train_tokenizer(["", "  "], "/tmp/never", vocab_size=400)

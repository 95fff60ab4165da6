"""Tokenizer wrapper and StreamDecoder: exact ids, exact streaming, clear errors."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm

from llama.tokenizer import StreamDecoder, Tokenizer, TokenizerError, load_tokenizer
from tests.conftest import shared_file

MULTILINGUAL = [
    "Hello world, once upon a time.",
    "Grüße aus Köln – naïve café, façade, Ærø.",
    "Привет, мир! Как дела?",
    "日本語のテキストと中文文本。",
    "emoji: 😀👍🏽🇫🇷 👩‍👩‍👧 ✨ — and € 100",
    "  leading and trailing spaces  \n\ttabs\nnew lines\n\n",
    "עברית ومرحبا بالعالم",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽 and a lone combining e\u0301",
]


@pytest.fixture(scope="module")
def llama_tok() -> Tokenizer:
    return load_tokenizer(shared_file("llama2-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def tok512() -> Tokenizer:
    return load_tokenizer(shared_file("stories260K", "tok512.model"))


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_ids_and_specials_match_sentencepiece(llama_tok: Tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(llama_tok.path))
    assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.vocab_size) == (1, 2, 32000)
    assert llama_tok.pad_id == -1  # Llama-2 defines no pad piece
    text = "Hello world, once upon a time."
    assert llama_tok.encode(text, bos=False) == sp.encode(text)
    assert llama_tok.encode(text) == [1, *sp.encode(text)]
    assert llama_tok.encode(text, bos=True, eos=True)[-1] == 2
    assert llama_tok.decode(llama_tok.encode(text, eos=True)) == text
    assert llama_tok.piece(15043) == "▁Hello"
    assert llama_tok.piece(1) == "<s>"


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_stream_round_trip_multilingual(llama_tok: Tokenizer, tok512: Tokenizer, text: str) -> None:
    for tok in (llama_tok, tok512):
        ids = tok.encode(text, bos=True)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        # No delta ever holds half a character: U+FFFD only appears if decode has it.
        assert all("\ufffd" not in d for d in deltas) or "\ufffd" in tok.decode(ids)


def test_stream_byte_fallback_held_until_complete(llama_tok: Tokenizer) -> None:
    ids = [llama_tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "€😀".encode()]
    deltas = stream(llama_tok, ids)
    assert deltas == ["", "", "€", "", "", "", "😀", ""]


def test_stream_keeps_inner_spaces_drops_first(llama_tok: Tokenizer) -> None:
    ids = llama_tok.encode("Hello world again", bos=False)
    deltas = stream(llama_tok, ids)
    assert deltas[:3] == ["Hello", " world", " again"]


@pytest.mark.parametrize("which", ["llama", "tok512"])
def test_stream_random_ids_equal_decode(
    llama_tok: Tokenizer, tok512: Tokenizer, which: str
) -> None:
    """Fuzz: arbitrary id sequences (bytes, controls, unknown, pieces) stream exactly."""
    tok = llama_tok if which == "llama" else tok512
    rng = random.Random(1234)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte(i)]
    for _ in range(1500):
        ids = []
        for _ in range(rng.randint(0, 14)):
            r = rng.random()
            pool = byte_ids if r < 0.4 else [0, 1, 2] if r < 0.5 else range(tok.vocab_size)
            ids.append(rng.choice(pool))
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_stream_random_text(llama_tok: Tokenizer) -> None:
    rng = random.Random(7)
    alphabet = "ab €é中😀\n ́Жא𝛼"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = llama_tok.encode(text, bos=rng.random() < 0.5)
        assert "".join(stream(llama_tok, ids)) == llama_tok.decode(ids) == text


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path)  # a directory


def test_bad_input(llama_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="lone surrogate U\\+D800 at character 1"):
        llama_tok.encode("a\ud800b")
    with pytest.raises(TokenizerError, match="expected str"):
        llama_tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="index 1"):
        llama_tok.decode([1, 32000])
    with pytest.raises(TokenizerError, match="index 0"):
        llama_tok.decode([-1])
    with pytest.raises(TokenizerError):
        llama_tok.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizerError):
        llama_tok.piece(99999)
    with pytest.raises(TokenizerError, match="32000"):
        StreamDecoder(llama_tok).push(32000)
    long = "word " * 20_000  # 100k characters encode fine
    assert len(llama_tok.encode(long)) > 10_000
    assert llama_tok.encode("") == [1]

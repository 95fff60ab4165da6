"""Bad GGUF input: one clear line naming the file and the key or tensor, never a traceback
from deep inside torch or numpy, never a silent wrong model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama.checkpoints import CheckpointError, load
from llama.checkpoints.gguf import read_metadata
from llama.checkpoints.gguf_writer import gguf_metadata, write_gguf
from llama.checkpoints.writers import meta_state, random_transformer
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = TINY_CONFIGS["gqa"]


@pytest.fixture(scope="module")
def state() -> dict:
    return meta_state(random_transformer(ARGS, seed=9))


def fails(path: Path, *fragments: str) -> str:
    """load(path) raises one line of CheckpointError naming the file and every fragment."""
    with pytest.raises(CheckpointError) as info:
        load(path, device="cpu", progress=False)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def edited(tmp_path: Path, state: dict, **changes: Any) -> Path:
    """A file whose metadata is the good one with `changes` (None deletes a key); keys are
    written with dots as double underscores."""
    meta = gguf_metadata(ARGS)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return write_gguf(state, ARGS, tmp_path / "bad.gguf", metadata=meta)


def test_truncated_in_the_metadata(tmp_path: Path, state: dict) -> None:
    good = write_gguf(state, ARGS, tmp_path / "good.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:200])
    fails(bad, "truncated GGUF file", "while reading metadata")
    with pytest.raises(CheckpointError, match="truncated"):
        read_metadata(bad)


def test_truncated_in_the_tensor_data(tmp_path: Path, state: dict) -> None:
    good = write_gguf(state, ARGS, tmp_path / "good.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:-1000])
    fails(bad, "truncated", "needs bytes up to", "'output.weight'")


@pytest.mark.parametrize("head", [b"GGML\x03\x00\x00\x00", b"", b"PK\x03\x04" + bytes(60)])
def test_wrong_magic(tmp_path: Path, head: bytes) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(head)
    fails(bad, "not a GGUF file", "magic")
    with pytest.raises(CheckpointError, match="magic"):
        read_metadata(bad)


def test_unsupported_version(tmp_path: Path, state: dict) -> None:
    data = bytearray(write_gguf(state, ARGS, tmp_path / "good.gguf").read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    bad = tmp_path / "v1.gguf"
    bad.write_bytes(bytes(data))
    fails(bad, "GGUF version", "found 1")


def test_unsupported_tensor_type(tmp_path: Path, state: dict) -> None:
    rows, cols = state["layers.0.attention.wq.weight"].shape
    iq = np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes / 32 values
    blocks = {"layers.0.attention.wq.weight": (iq, "IQ4_NL")}
    bad = write_gguf(state, ARGS, tmp_path / "iq.gguf", blocks=blocks)
    fails(bad, "'blk.0.attn_q.weight'", "IQ4_NL", "not supported")


def test_another_architecture_refused_by_name(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, general__architecture="qwen2")
    fails(bad, "general.architecture", "'qwen2'", "'llama'")


@pytest.mark.parametrize(
    "key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
            "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon"],
)  # fmt: skip
def test_missing_metadata_key(tmp_path: Path, state: dict, key: str) -> None:
    bad = edited(tmp_path, state, **{key.replace(".", "__"): None})
    fails(bad, "missing metadata key", repr(key))


def test_wrongly_typed_metadata_value(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, llama__block_count="two")
    fails(bad, "'llama.block_count'", "expected an integer", "'two'")


def test_tokenizer_vocabulary_differs_from_the_embedding(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, tokenizer__ggml__tokens=[f"t{i}" for i in range(96)])
    fails(bad, "tokenizer.ggml.tokens has 96 tokens", "'token_embd.weight' has 97 rows")


def test_declared_vocab_size_differs_from_the_embedding(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, llama__vocab_size=32000)
    fails(bad, "llama.vocab_size is 32000", "97 rows")


def test_tensor_shape_differs_from_the_metadata(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, llama__feed_forward_length=ARGS.ffn_hidden_dim + 16)
    fails(bad, "'blk.0.ffn_gate.weight'", "has shape", "expected")


def test_head_count_that_does_not_fit_the_tensors(tmp_path: Path, state: dict) -> None:
    bad = edited(tmp_path, state, llama__attention__head_count_kv=1)
    fails(bad, "tensor 'blk.0.attn_k.weight' has shape (32, 64), expected (16, 64)")


@pytest.mark.parametrize(
    ("key", "value"),
    [("llama.rope.scaling.type", "yarn"), ("llama.rope.scaling.factor", 4.0),
     ("llama.rope.dimension_count", 8)],
)  # fmt: skip
def test_rope_variants_we_do_not_implement_are_refused_by_name(
    tmp_path: Path, state: dict, key: str, value: Any
) -> None:
    bad = edited(tmp_path, state, **{key.replace(".", "__"): value})
    fails(bad, key, repr(value))


def test_unexpected_tensor(tmp_path: Path, state: dict) -> None:
    bad = write_gguf(state, ARGS, tmp_path / "renamed.gguf")
    data = bad.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    bad.write_bytes(data)
    fails(bad, "unexpected tensor 'blk.1.ffn_xx.weight'")


def test_directory_with_two_gguf_files(tmp_path: Path, state: dict) -> None:
    write_gguf(state, ARGS, tmp_path / "a.gguf")
    write_gguf(state, ARGS, tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"expected one \.gguf file, found 2: a.gguf"):
        load(tmp_path, device="cpu", progress=False)


def test_absurd_counts_fail_fast_as_truncation(tmp_path: Path) -> None:
    """A header claiming 2**60 metadata entries or a 2**62-byte string reads nothing huge."""
    for tail in ((2**60).to_bytes(8, "little"),
                 (1).to_bytes(8, "little") + (2**62).to_bytes(8, "little") + b"key"):  # fmt: skip
        bad = tmp_path / "absurd.gguf"
        bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + tail)
        fails(bad, "truncated GGUF file")


def test_cli_model_flag_reaches_the_gguf_loader(tmp_path: Path, state: dict) -> None:
    """`--model FILE.gguf` goes through load(): the loader's one-line error comes out."""
    from tests.test_cli import run_main

    bad = edited(tmp_path, state, general__architecture="gemma")
    code, out, err = run_main("complete", "--model", str(bad), "--prompt", "x")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and "general.architecture is 'gemma'" in err

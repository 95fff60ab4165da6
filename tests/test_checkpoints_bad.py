"""Bad input: every loader refuses missing, truncated, corrupt, wrong-shaped, inconsistent and
hostile files with a CheckpointError naming the file and the problem, and leaves the files as
they were."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama.checkpoints import CheckpointError, detect, load, save
from llama.checkpoints.writers import (
    meta_state,
    random_transformer,
    write_hf,
    write_llama2c,
    write_meta,
)
from tests.conftest import TINY_CONFIGS, shared_file

ARGS = TINY_CONFIGS["gqa"]


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(path: Path, *patterns: str, **kwargs: object) -> str:
    """load(path) must raise CheckpointError whose message holds every pattern; files intact."""
    before = digest(path) if path.exists() else {}
    with pytest.raises(CheckpointError) as info:
        load(path, device="cpu", progress=False, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    assert (digest(path) if path.exists() else {}) == before
    return message


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return meta_state(random_transformer(ARGS))


def native_dir(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save(random_transformer(ARGS), root)
    save_file(tensors, str(root / "model.safetensors"))
    return root


# Missing files ---------------------------------------------------------------------------
def test_missing_params_json(state: dict, tmp_path: Path) -> None:
    (write_meta(state, ARGS, tmp_path) / "params.json").unlink()
    refused(tmp_path, str(tmp_path), "missing params.json")


def test_missing_config_json(state: dict, tmp_path: Path) -> None:
    (write_hf(state, ARGS, tmp_path) / "config.json").unlink()
    refused(tmp_path, "missing config.json")


def test_missing_tokenizer_when_meta_needs_its_vocab(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path, vocab_in_params=False)
    refused(tmp_path, "missing tokenizer.model", "vocab_size -1")


def test_missing_explicit_tokenizer(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    refused(tmp_path, str(tmp_path / "nope.model"), "tokenizer",
            tokenizer_path=tmp_path / "nope.model")


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    refused(tmp_path / "absent", "no such file or directory")
    refused(tmp_path, "no checkpoint found")


def test_index_lists_a_missing_shard(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path, n_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    refused(tmp_path, "model-00002-of-00002.safetensors", "model.safetensors.index.json")


# Truncated and corrupt -------------------------------------------------------------------
def test_truncated_pth(state: dict, tmp_path: Path) -> None:
    path = write_meta(state, ARGS, tmp_path) / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(tmp_path, str(path), "truncated")


def test_corrupt_pth(state: dict, tmp_path: Path) -> None:
    path = write_meta(state, ARGS, tmp_path) / "consolidated.00.pth"
    path.write_bytes(b"not a zip archive" * 100)
    refused(tmp_path, str(path))


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_truncated_safetensors(layout: str, state: dict, tmp_path: Path) -> None:
    if layout == "hf":
        write_hf(state, ARGS, tmp_path)
    else:
        save(random_transformer(ARGS), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(tmp_path, str(path), "truncated safetensors file", "expected")


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    save(random_transformer(ARGS), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#garbage####"
    path.write_bytes(bytes(data))
    refused(tmp_path, str(path), "safetensors")


@pytest.mark.parametrize("version", [0, 1])
def test_truncated_llama2c(version: int, state: dict, tmp_path: Path) -> None:
    path = write_llama2c(state, ARGS, tmp_path / "m.bin", version, shared=False)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-40])
    refused(path, str(path), "truncated", str(size), str(size - 40))


def test_llama2c_header_of_another_file(tmp_path: Path) -> None:
    tokenizer_bin = shared_file("stories260K", "tok512.bin")
    refused(tokenizer_bin, str(tokenizer_bin), "not a llama2.c checkpoint")
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\x01\x02")
    refused(tiny, "truncated llama2.c header")


def test_llama2c_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "q80.bin"
    path.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 96, 2, 4, 2, 97, 64, 1)
                     + b"\0" * 300)
    refused(path, "version 2 is not supported")


def test_params_json_not_json(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path)
    (tmp_path / "params.json").write_text("{dim: 64")
    refused(tmp_path, "params.json", "not valid JSON")


def test_config_json_missing_field(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    refused(tmp_path, "config.json", "num_hidden_layers")


# Wrong shapes and keys -------------------------------------------------------------------
def test_wrong_shape_names_key_expected_and_found(state: dict, tmp_path: Path) -> None:
    state["layers.1.attention.wk.weight"] = torch.zeros(64, 64)
    native_dir(tmp_path, state)
    refused(tmp_path, "'layers.1.attention.wk.weight'", "(64, 64)", "expected (32, 64)")


def test_wrong_shape_in_hf_names_the_hf_key(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    refused(tmp_path, "model.layers.0.mlp.up_proj.weight", "(3, 64)", "expected")


def test_unexpected_key(state: dict, tmp_path: Path) -> None:
    native_dir(tmp_path, state | {"layers.0.attention.wqkv.weight": torch.zeros(2, 2)})
    refused(tmp_path, "unexpected key 'layers.0.attention.wqkv.weight'")


def test_unknown_hf_key(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    refused(tmp_path, "unexpected key 'model.layers.0.self_attn.q_proj.bias'")


def test_missing_keys(state: dict, tmp_path: Path) -> None:
    del state["layers.1.feed_forward.w3.weight"]
    native_dir(tmp_path, state)
    refused(tmp_path, "missing 1 tensor(s)", "layers.1.feed_forward.w3.weight")


def test_untied_hf_without_lm_head(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    refused(tmp_path, "missing", "output.weight")


# Inconsistent ----------------------------------------------------------------------------
def test_shard_count_mismatch(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").unlink()
    refused(tmp_path, "1 shard(s)", "expected (97, 64)", "wrong number of shards")


def test_shard_numbering_gap(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    refused(tmp_path, "numbered 00..01", "consolidated.02.pth")


def test_vocab_disagrees_with_tokenizer(tmp_path: Path) -> None:
    tok = shared_file("stories260K", "tok512.model")
    save(random_transformer(ARGS), tmp_path, tokenizer_path=tok)
    refused(tmp_path, "vocab_size is 97", "512 pieces")


def test_corrupt_tokenizer(tmp_path: Path) -> None:
    save(random_transformer(ARGS), tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    refused(tmp_path, "tokenizer.model", "not a readable SentencePiece model")


def test_two_formats_in_one_directory(state: dict, tmp_path: Path) -> None:
    write_hf(state, ARGS, tmp_path)
    save(random_transformer(ARGS), tmp_path)
    with pytest.raises(CheckpointError, match=r"more than one checkpoint format \(hf, native\)"):
        detect(tmp_path)
    refused(tmp_path, "more than one checkpoint format")


# Hostile ---------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: exactly what weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_with_code_is_refused_not_executed(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-executed"
    shard = tmp_path / "consolidated.00.pth"
    torch.save({**state, "payload": _Payload(marker)}, shard)
    refused(tmp_path, str(shard), "refused")
    assert not marker.exists()
    # The file really is hostile: an unguarded torch.load runs the payload.
    torch.load(shard, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()


def test_legacy_non_zip_pth_is_refused(state: dict, tmp_path: Path) -> None:
    write_meta(state, ARGS, tmp_path)
    shard = tmp_path / "consolidated.00.pth"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    refused(tmp_path, str(shard))


def test_weights_file_instead_of_directory(tmp_path: Path) -> None:
    save(random_transformer(ARGS), tmp_path)
    refused(tmp_path / "model.safetensors", "not a llama2.c checkpoint", "pass their directory")

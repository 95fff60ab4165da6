"""The same random weights in every format load to identical logits; detect, save, options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama.checkpoints import LoadedModel, detect, load, save
from llama.checkpoints.writers import (
    meta_state,
    random_transformer,
    write_hf,
    write_llama2c,
    write_meta,
)
from llama.config import ModelArgs
from tests.conftest import TINY_CONFIGS, shared_file

LAYOUTS = ("meta-1", "meta-2", "hf", "hf-sharded", "hf-bin", "native",
           "llama2c-v0", "llama2c-v0-separate", "llama2c-v1", "llama2c-v1-separate")


def write(layout: str, model: torch.nn.Module, root: Path) -> Path:
    """Write `model` in `layout` under root; returns the path to give load()."""
    args, state = model.args, meta_state(model)
    target = root / layout
    if layout.startswith("meta"):
        return write_meta(state, args, target, n_shards=int(layout[-1]))
    if layout.startswith("hf"):
        return write_hf(state, args, target, n_shards=3 if "sharded" in layout else 1,
                        torch_bin=layout == "hf-bin")
    if layout == "native":
        return save(model, target)
    version = 0 if "v0" in layout else 1
    return write_llama2c(state, args, root / f"{layout}.bin", version,
                         shared="separate" not in layout)


def tied_copy(model: torch.nn.Module) -> torch.nn.Module:
    """llama2.c's shared classifier needs output == embedding: tie a copy."""
    twin = random_transformer(model.args)
    twin.load_state_dict(model.state_dict())
    twin.output.weight = twin.tok_embeddings.weight
    return twin


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_identical_logits(layout: str, tmp_path: Path) -> None:
    model = random_transformer(TINY_CONFIGS["gqa"], seed=1)
    if layout.startswith("llama2c") and "separate" not in layout:
        model = tied_copy(model)
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        expected = model(tokens)
    path = write(layout, model, tmp_path)
    loaded = load(path, device="cpu", progress=False, fuse=False)  # bit-exact: as on disk
    assert loaded.format == detect(path) == layout.split("-")[0]
    with torch.no_grad():
        got = loaded.model(tokens)
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_meta_two_shards_equal_hf_sharded_for_each_attention_kind(
    kind: str, tmp_path: Path
) -> None:
    model = random_transformer(TINY_CONFIGS[kind], seed=2)
    tokens = torch.randint(0, 97, (1, 9))
    a = load(write("meta-2", model, tmp_path), device="cpu", progress=False).model
    b = load(write("hf-sharded", model, tmp_path), device="cpu", progress=False).model
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_loaded_model_is_ready(tmp_path: Path) -> None:
    model = random_transformer(TINY_CONFIGS["mqa"])
    loaded = load(save(model, tmp_path), device="cpu", progress=False)
    assert isinstance(loaded, LoadedModel)
    m = loaded.model
    assert not m.training and m.caches() == []
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.load_in_8bit and loaded.tokenizer_path is None
    assert m.rope_cos.device.type == "cpu" and m.rope_cos.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in m.parameters())
    m.setup_caches(1)
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, torch.arange(6)), model(tokens))


def test_save_writes_a_tied_model_without_output_weight(tmp_path: Path) -> None:
    from safetensors import safe_open

    tok = shared_file("stories260K", "tok512.model")
    model = random_transformer(TINY_CONFIGS["gqa"].replace(vocab_size=512))
    model.output.weight = model.tok_embeddings.weight
    directory = save(model, tmp_path / "out", tokenizer_path=tok)
    assert (directory / "tokenizer.model").read_bytes() == tok.read_bytes()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys()
    loaded = load(directory, device="cpu", progress=False)
    assert loaded.tokenizer_path == directory / "tokenizer.model"
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight
    assert ModelArgs.from_params_json(directory / "params.json") == model.args


def test_dtype_and_max_seq_len_overrides(tmp_path: Path) -> None:
    model = random_transformer(TINY_CONFIGS["gqa"])
    path = write("hf", model, tmp_path)
    loaded = load(path, device="cpu", dtype=torch.bfloat16, max_seq_len=20, progress=False)
    m = loaded.model
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.args.max_seq_len == 20 and m.rope_cos.shape == (20, 8)
    assert m.rope_cos.dtype == torch.float32  # RoPE tables stay fp32
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), model(tokens), atol=0.15, rtol=0.05)


def test_meta_vocab_from_tokenizer_and_rope_freqs_ignored(tmp_path: Path) -> None:
    """Meta's params.json says vocab_size -1: the tokenizer supplies it."""
    tok = shared_file("stories260K", "tok512.model")
    args = TINY_CONFIGS["gqa"].replace(vocab_size=512)
    model = random_transformer(args)
    directory = write_meta(meta_state(model), args, tmp_path, n_shards=2, vocab_in_params=False)
    (directory / "tokenizer.model").write_bytes(tok.read_bytes())
    assert "rope.freqs" in torch.load(directory / "consolidated.00.pth", weights_only=True)
    loaded = load(directory, device="cpu", progress=False, fuse=False)
    assert loaded.model.args.vocab_size == 512
    assert loaded.model.args.max_seq_len == 4096  # LLaMA-2's context when params.json is silent
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))


def test_explicit_tokenizer_path_and_llama2c_single_model_file(tmp_path: Path) -> None:
    tok = shared_file("stories260K", "tok512.model")
    args = TINY_CONFIGS["mha"].replace(vocab_size=512)
    model = tied_copy(random_transformer(args))
    path = write_llama2c(meta_state(model), args, tmp_path / "m.bin", version=1)
    assert load(path, device="cpu", progress=False).tokenizer_path is None
    (tmp_path / "tok512.model").write_bytes(tok.read_bytes())
    assert load(path, device="cpu", progress=False).tokenizer_path == tmp_path / "tok512.model"
    loaded = load(path, device="cpu", tokenizer_path=tok, progress=False)
    assert loaded.tokenizer_path == tok


def test_progress_bar_can_be_shown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write("native", random_transformer(TINY_CONFIGS["mha"]), tmp_path)
    load(path, device="cpu", progress=True)
    assert "loading" in capsys.readouterr().err
    load(path, device="cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_llama2c_model_saves_as_native(tmp_path: Path) -> None:
    """llama2.c tensors are views into one file mapping: save() must still write them apart."""
    model = tied_copy(random_transformer(TINY_CONFIGS["gqa"], seed=4))
    loaded = load(write("llama2c-v1", model, tmp_path), device="cpu", progress=False).model
    again = load(save(loaded, tmp_path / "native"), device="cpu", progress=False,
                 fuse=False).model
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    assert again.output.weight is again.tok_embeddings.weight

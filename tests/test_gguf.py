"""GGUF checkpoints: every supported tensor type loads to what gguf's own dequantiser gives,
and real checkpoints written as GGUF (by us, and by llama.cpp's converter) reproduce their
known greedy outputs token for token.

The reference side never uses our reader: it reads with gguf.GGUFReader and dequantises with
gguf.quants.dequantize.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama.checkpoints import detect, load
from llama.checkpoints.gguf import meta_name, read_metadata
from llama.checkpoints.gguf_quants import TYPES, dequantize
from llama.checkpoints.gguf_writer import sentencepiece_metadata, write_gguf
from llama.checkpoints.writers import meta_state, random_transformer
from llama.config import ModelArgs
from llama.model import Transformer
from tests.conftest import REPO, TINY_CONFIGS, shared_file

pytestmark = pytest.mark.usefixtures("one_thread")

QUANTISED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Rows of 32-value blocks need every matrix's inner size to be a multiple of 32, K-quants 256.
BLOCK32 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                    hidden_dim=96, max_seq_len=64)  # fmt: skip
BLOCK256 = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=61,
                     hidden_dim=256, max_seq_len=32)  # fmt: skip
# Byte offsets of each K-quant block's fp16 scales (ggml-common.h), so hand-built random
# blocks get finite, small scales.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                   "Q6_K": (208,)}  # fmt: skip


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`: one prefill, then one cached decode step per token."""
    model.setup_caches(1)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))  # (1, T, vocab)
        for pos in range(len(prompt), len(prompt) + n):
            out.append(int(logits[0, -1].argmax()))
            if len(out) < n:
                logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))
    return out


def reference_model(path: Path, args: ModelArgs) -> Transformer:
    """The model gguf's own reader and dequantiser see in `path` (output tied when absent)."""
    reader = gguf.GGUFReader(path)
    state = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        state[meta_name(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32))
        state[meta_name(t.name)] = state[meta_name(t.name)].reshape(shape)
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model.eval()


def assert_same_logits(path: Path, args: ModelArgs) -> None:
    loaded = load(path, device="cpu", progress=False, fuse=False)
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        got, expected = loaded.model(tokens), reference_model(path, args)(tokens)
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("qtype", QUANTISED)
def test_each_type_with_a_quantiser_loads_to_gguf_dequantised_weights(
    qtype: str, tmp_path: Path
) -> None:
    model = random_transformer(BLOCK32, seed=4)
    path = write_gguf(meta_state(model), BLOCK32, tmp_path / f"m-{qtype}.gguf", qtype)
    assert_same_logits(path, BLOCK32)
    if qtype == "F32":  # stored exactly: the original model's own logits
        tokens = torch.randint(0, 97, (1, 7))
        got = load(path, device="cpu", progress=False, fuse=False).model(tokens)
        assert torch.equal(got, model(tokens))


def random_blocks(qtype: str, rows: int, cols: int, gen: np.random.Generator) -> np.ndarray:
    """Random bytes for a (rows, cols) tensor of `qtype`, with small finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = gen.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_SCALE_OFFSETS[qtype]:
        scale = gen.uniform(1e-4, 2e-3, (rows, cols // block)).astype(np.float16)
        raw[:, :, at : at + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_each_k_quant_loads_to_gguf_dequantised_weights(qtype: str, tmp_path: Path) -> None:
    """gguf has no K-quant quantiser: the matrices are hand-built random blocks."""
    model = random_transformer(BLOCK256, seed=5)
    state = meta_state(model)
    gen = np.random.default_rng(6)
    blocks = {n: (random_blocks(qtype, *t.shape, gen), qtype)
              for n, t in state.items() if t.dim() == 2}  # fmt: skip
    path = write_gguf(state, BLOCK256, tmp_path / f"k-{qtype}.gguf", blocks=blocks)
    assert_same_logits(path, BLOCK256)


@pytest.mark.parametrize("ggml_type", sorted(t for t in TYPES if TYPES[t][1] > 1))
def test_block_kernels_equal_gguf_bit_for_bit_on_any_bytes(ggml_type: int) -> None:
    """Every byte pattern, NaN/inf scales included, dequantises exactly as gguf's numpy."""
    name, block, size = TYPES[ggml_type]
    raw = np.random.default_rng(ggml_type).integers(0, 256, (8, 3 * size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    got = dequantize(torch.from_numpy(raw.copy()).flatten(), ggml_type, (8, 3 * block))
    np.testing.assert_array_equal(got.numpy(), expected)


def test_tied_output_when_the_file_has_no_output_weight(tmp_path: Path) -> None:
    model = random_transformer(TINY_CONFIGS["mqa"], seed=7)
    model.output.weight = model.tok_embeddings.weight
    path = write_gguf(meta_state(model), model.args, tmp_path / "tied.gguf", tied=True)
    loaded = load(path, device="cpu", progress=False, fuse=False)
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight
    tokens = torch.randint(0, 97, (1, 5))
    assert torch.equal(loaded.model(tokens), model(tokens))


def test_file_or_directory_detected_and_loaded_with_its_metadata(tmp_path: Path) -> None:
    model = random_transformer(TINY_CONFIGS["gqa"], seed=8)
    path = write_gguf(meta_state(model), model.args, tmp_path / "d" / "only.gguf")
    assert detect(path) == detect(path.parent) == "gguf"
    for target in (path, path.parent):
        loaded = load(target, device="cpu", progress=False)
        assert loaded.format == "gguf" and loaded.tokenizer_path == path
        a, b = loaded.model.args, model.args
        assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_hidden_dim, a.vocab_size) == (
            b.dim,
            b.n_layers,
            b.n_heads,
            b.kv_heads,
            b.ffn_hidden_dim,
            b.vocab_size,
        )
        assert a.norm_eps == pytest.approx(b.norm_eps) and a.max_seq_len == b.max_seq_len
        assert loaded.metadata == read_metadata(path)
        assert loaded.metadata["llama.attention.head_count_kv"] == 2


def test_read_metadata_gives_plain_python_values() -> None:
    path = shared_file("gguf-llamacpp", "tinychat-f16.gguf")
    meta = read_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 6
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 4096
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[7] == "<0x00>"
    assert all(type(x) is str for x in tokens) and all(type(x) is float for x in scores)
    assert all(type(x) is int for x in types) and types[:3] == [2, 3, 3] and types[7] == 6
    assert type(meta["llama.rope.freq_base"]) is float
    reader = gguf.GGUFReader(path)  # the gguf package agrees on every key
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert field.contents() == pytest.approx(meta[key]), key


@pytest.mark.parametrize("case", range(4))
def test_files_llamacpp_converted_reproduce_its_greedy_ids(case: int) -> None:
    """f16 and q8_0 files from convert_hf_to_gguf.py: the Q/K rows are in Meta's order
    (we load them unpermuted) and llama.cpp's own 32 greedy ids come out."""
    path = shared_file("gguf-llamacpp", "llamacpp_reference.json")
    c = json.loads(path.read_text())["cases"][case]
    loaded = load(path.parent / c["file"], device="cpu", progress=False)
    assert loaded.model.args.attention_kind == "GQA"
    assert greedy(loaded.model, c["prompt_ids"], len(c["greedy_ids"])) == c["greedy_ids"]


def test_written_sentencepiece_vocabulary_equals_llamacpp_converters() -> None:
    ours = sentencepiece_metadata(REPO / "assets" / "tinychat" / "tokenizer.model")
    theirs = read_metadata(shared_file("gguf-llamacpp", "tinychat-f16.gguf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type"):  # fmt: skip
        assert ours[key] == theirs[key], key


def native_and_gguf_greedy(native: Path, tokenizer: Path, tmp_path: Path) -> None:
    base = load(native, device="cpu", progress=False)
    state = meta_state(base.model)
    tied = base.model.output_tied
    path = write_gguf(state, base.model.args, tmp_path / "m.gguf", tokenizer=tokenizer,
                      tied=tied)  # fmt: skip
    ours = load(path, device="cpu", progress=False)
    assert ours.metadata["tokenizer.ggml.model"] == "llama"
    assert ours.model.output_tied == tied
    prompt = [1, 449, 476, 265, 417] if base.model.args.vocab_size > 512 else [1]
    n = 64
    assert greedy(ours.model, prompt, n) == greedy(base.model, prompt, n)


def test_shipped_model_as_gguf_reproduces_its_native_greedy_output(tmp_path: Path) -> None:
    native = REPO / "assets" / "tinychat"
    native_and_gguf_greedy(native, native / "tokenizer.model", tmp_path)


def test_stories260k_as_gguf_reproduces_its_native_greedy_output(tmp_path: Path) -> None:
    path = shared_file("stories260K", "stories260K.bin")
    native_and_gguf_greedy(path, path.parent / "tok512.model", tmp_path)

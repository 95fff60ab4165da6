"""A real trained checkpoint reproduces llama2.c's own greedy output (stories260K, GQA).

reference_greedy_200.txt is what llama2.c's run.c prints for 200 greedy tokens after BOS;
it equals SentencePiece's decode of [BOS] + those ids with tok512.model.
"""

from __future__ import annotations

import sentencepiece
import torch

from llama.checkpoints import detect, load
from tests.conftest import shared_file


def greedy_ids(model: torch.nn.Module, n: int, bos: int = 1) -> list[int]:
    """n greedy tokens after BOS, one cached decode step per token."""
    model.setup_caches(1)
    out: list[int] = []
    token = bos
    with torch.no_grad():
        for pos in range(n):
            logits = model(torch.tensor([[token]]), torch.tensor([pos]))  # (1, 1, vocab)
            token = int(logits[0, -1].argmax())
            out.append(token)
    return out


def test_greedy_200_matches_llama2c_run_c() -> None:
    path = shared_file("stories260K", "stories260K.bin")
    reference = shared_file("stories260K", "reference_greedy_200.txt").read_text("utf-8")
    loaded = load(path, device="cpu", progress=False)
    assert loaded.format == "llama2c" and detect(path) == "llama2c"
    assert loaded.tokenizer_path is not None and loaded.tokenizer_path.name == "tok512.model"
    args = loaded.model.args
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size) == (
        64, 5, 8, 4, 512)
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight  # shared classifier
    ids = greedy_ids(loaded.model, 200)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
    assert sp.decode([1, *ids]) == reference


def test_directory_path_finds_the_bin_among_tokenizer_files() -> None:
    """The folder also holds tok512.bin (a tokenizer): detection goes by content."""
    path = shared_file("stories260K", "stories260K.bin")
    assert detect(path.parent) == "llama2c"
    loaded = load(path.parent, device="cpu", progress=False)
    x = torch.randint(0, 512, (1, 12))
    direct = load(path, device="cpu", progress=False).model
    torch.testing.assert_close(loaded.model(x), direct(x), rtol=0, atol=0)

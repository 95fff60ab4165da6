"""Parity with transformers (the reference) on the same GGUF file.

transformers reads GGUF with the gguf package and un-permutes q/k for its half-rotation RoPE,
i.e. it takes GGUF's q/k rows to be in Meta's interleaved order; we load them unchanged. Equal
logits on random GQA/MQA/MHA files (where a wrong or missing permutation, or one applied with
the wrong head count, changes every logit) and on SmolLM2 prove the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama import functional
from llama.checkpoints import load
from llama.checkpoints.gguf_writer import write_gguf
from llama.checkpoints.writers import meta_state, random_transformer
from tests.conftest import TINY_CONFIGS, shared_file
from tests.test_gguf import BLOCK32, greedy

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
transformers = pytest.importorskip("transformers")

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def reference(path: Path) -> torch.nn.Module:
    """transformers' LlamaForCausalLM from the GGUF file, fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, ids: list[int]) -> float:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    return float((a - b).abs().max())


@pytest.mark.parametrize(("kind", "qtype"), [("gqa", "F32"), ("mqa", "F16"), ("mha", "F32")])
def test_random_tiny_files_match_transformers(kind: str, qtype: str, tmp_path: Path) -> None:
    args = TINY_CONFIGS[kind]
    path = write_gguf(meta_state(random_transformer(args, seed=10)), args, tmp_path / "m.gguf",
                      qtype)  # fmt: skip
    ids = torch.randint(0, args.vocab_size, (17,)).tolist()
    ours = load(path, device="cpu", progress=False).model
    assert max_diff(ours, reference(path), ids) <= 1e-5


def test_quantised_tiny_file_matches_transformers(tmp_path: Path) -> None:
    model = random_transformer(BLOCK32, seed=11)
    path = write_gguf(meta_state(model), BLOCK32, tmp_path / "q.gguf", "Q5_1", tied=True)
    ids = torch.randint(0, BLOCK32.vocab_size, (13,)).tolist()
    ours = load(path, device="cpu", progress=False).model
    assert max_diff(ours, reference(path), ids) <= 1e-5


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(ours, transformers', published reference values) on the same SmolLM2 file."""
    path = shared_file("smollm2", SMOLLM2)
    published = json.loads((path.parent / "transformers_reference.json").read_text())
    ours = load(path, device="cpu", dtype=torch.float32, progress=False)
    assert ours.format == "gguf" and ours.model.args.attention_kind == "GQA"
    return ours.model, reference(path), published


def prompts(published: dict) -> list[list[int]]:
    """The published chat and raw prompts, llama.cpp's second raw prompt, and a long one."""
    llamacpp = json.loads(shared_file("smollm2", "llamacpp_reference.json").read_text())
    chat, raw = published["chat"][0], published["raw"][0]
    long = chat["prompt_ids"] + chat["ids"] + raw["prompt_ids"] + raw["ids"]
    return [chat["prompt_ids"], raw["prompt_ids"], llamacpp["cases"][1]["prompt_ids"], long]


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax over n steps with its own KV cache (EOS does not stop it)."""
    ids: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values,
                        use_cache=True)  # fmt: skip
    return ids


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_several_prompts(
    smollm2, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through MKL's products (torch's F.linear, what transformers runs) within 1e-4; through
    oneDNN's (our CPU default, llama.functional.onednn_fp32), whose sums run in another
    order, within 2e-4 (1.1e-4 seen on the long prompt, logits of magnitude ~20)."""
    ours, theirs, published = smollm2
    for ids in prompts(published):
        assert max_diff(ours, theirs, ids) <= 2e-4, ids
    monkeypatch.setattr(functional, "_ONEDNN_FP32", False)
    for ids in prompts(published):
        assert max_diff(ours, theirs, ids) <= 1e-4, ids


@pytest.mark.slow
@pytest.mark.parametrize("which", ["chat", "raw"])
def test_smollm2_32_greedy_tokens_match_transformers(smollm2, which: str) -> None:
    ours, theirs, published = smollm2
    prompt = published[which][0]["prompt_ids"]
    expected = hf_greedy(theirs, prompt, 32)
    assert greedy(ours, prompt, 32) == expected
    assert expected[: len(published[which][0]["ids"])] == published[which][0]["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["chat", "raw"])
def test_smollm2_matches_the_published_reference(smollm2, which: str) -> None:
    """transformers_reference.json: greedy ids, and the first step's top-10 ids and logits."""
    ours, _, published = smollm2
    case = published[which][0]
    prompt = case["prompt_ids"]
    assert greedy(ours, prompt, len(case["ids"])) == case["ids"]
    ours.setup_caches(1)
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1]
    top = logits.topk(10)
    assert top.indices.tolist() == case["first_top10_ids"]
    expected = torch.tensor(case["first_top10_logits"])
    assert float((top.values - expected).abs().max()) <= 1e-4

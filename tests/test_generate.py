"""generate(): real decoding on stories260K and a tiny random model; every stop rule asserted."""

from __future__ import annotations

import threading

import pytest
import torch

from llama.chat import encode_dialog
from llama.config import ModelArgs
from llama.generate import NO_TOKEN, GenerateError, Step, StopGate, generate, prompt_budget
from llama.model import Transformer
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer, load_tokenizer, open_tokenizer
from tests.conftest import shared_file

GREEDY = SamplingParams(temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories() -> tuple[Transformer, Tokenizer]:
    from llama.checkpoints import load

    loaded = load(shared_file("stories260K", "stories260K.bin"), device="cpu", progress=False)
    assert loaded.tokenizer_path is not None
    return loaded.model, open_tokenizer(loaded)


@pytest.fixture(scope="module")
def tiny() -> tuple[Transformer, Tokenizer]:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128
    )
    return Transformer(args).eval(), load_tokenizer(shared_file("stories260K", "tok512.model"))


def run(model, tok, prompt, params=GREEDY, **kw) -> list[Step]:
    return list(generate(model, tok, prompt, params, **kw))


def ids_of(steps: list[Step]) -> list[int]:
    return [s.token_id for s in steps if s.token_id != NO_TOKEN]


def text_of(steps: list[Step]) -> str:
    return "".join(s.text for s in steps)


def test_greedy_reproduces_llama2c_reference(stories) -> None:
    model, tok = stories
    steps = run(model, tok, [tok.bos_id], GREEDY.replace(max_new_tokens=200))
    reference = shared_file("stories260K", "reference_greedy_200.txt").read_text("utf-8")
    assert text_of(steps) == reference
    assert [s.position for s in steps] == list(range(1, 201))
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])


def test_cached_decode_equals_full_forward(tiny) -> None:
    model, tok = tiny
    prompt = tok.encode("Once upon a time")
    steps = run(model, tok, prompt, GREEDY.replace(max_new_tokens=12), n_top=3)
    seq = list(prompt)
    with torch.inference_mode():
        for step in steps:
            logits = model(torch.tensor([seq]))[0, -1]  # no cache: plain causal forward
            probs = torch.softmax(logits, -1)
            assert step.token_id == int(logits.argmax())
            assert step.prob == pytest.approx(float(probs[step.token_id]), rel=1e-4)
            top = torch.topk(probs, 3)
            assert [c.token_id for c in step.top] == top.indices.tolist()
            assert [c.prob_before for c in step.top] == pytest.approx(top.values.tolist(), rel=1e-4)
            assert [c.prob_after for c in step.top] == [1.0, 0.0, 0.0]  # greedy: one-hot
            seq.append(step.token_id)
    # n_top=0 (the terminal's and the benchmark's path): the same tokens and probabilities
    bare = run(model, tok, prompt, GREEDY.replace(max_new_tokens=12), n_top=0)
    assert ids_of(bare) == ids_of(steps) and all(not b.top for b in bare)
    assert [b.prob for b in bare] == pytest.approx([s.prob for s in steps], rel=1e-6)


def test_stream_text_equals_decode_when_sampling(tiny) -> None:
    model, tok = tiny  # random weights: plenty of byte-fallback tokens
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=5, max_new_tokens=40)
    steps = run(model, tok, tok.encode("héllo €"), params)
    assert text_of(steps) == tok.decode(ids_of(steps))
    assert any(tok.is_byte(t) for t in ids_of(steps))


def test_seed_reproduces_and_filters_apply(tiny) -> None:
    model, tok = tiny
    params = SamplingParams(temperature=1.2, top_k=5, top_p=0.95, seed=42, max_new_tokens=15)
    first, second = run(model, tok, [tok.bos_id], params), run(model, tok, [tok.bos_id], params)
    assert ids_of(first) == ids_of(second)
    assert ids_of(first) != ids_of(run(model, tok, [tok.bos_id], params.replace(seed=43)))
    for step in first:
        assert [c.prob_before for c in step.top] == sorted(
            (c.prob_before for c in step.top), reverse=True
        )
        assert sum(c.prob_after > 0 for c in step.top) <= 5
        assert step.token_id in [c.token_id for c in step.top]  # top-k=5 of 5 shown


def test_max_new_tokens(stories) -> None:
    model, tok = stories
    steps = run(model, tok, tok.encode("Once upon a time"), GREEDY.replace(max_new_tokens=7))
    assert len(steps) == 7 and steps[-1].finish_reason == "length"
    assert steps[0].ttft_s is not None and steps[-1].elapsed_s >= steps[0].elapsed_s


def test_stop_string_ends_before_it(stories) -> None:
    model, tok = stories
    prompt = tok.encode("Once upon a time")
    full = text_of(run(model, tok, prompt, GREEDY.replace(max_new_tokens=60)))
    stop = "named"  # the greedy story names its hero; check the premise first
    assert stop in full
    steps = run(model, tok, prompt, GREEDY.replace(max_new_tokens=60, stop=("zzz", stop)))
    assert steps[-1].finish_reason == "stop"
    assert text_of(steps) == full[: full.index(stop)]
    # A stop string that never completes: what was held back as a possible start is released.
    steps = run(model, tok, prompt, GREEDY.replace(max_new_tokens=60, stop=("named Bob",)))
    assert steps[-1].finish_reason == "length" and text_of(steps) == full
    for i in range(len(steps)):
        if tok.decode(ids_of(steps[: i + 1])).endswith("named"):
            assert not text_of(steps[: i + 1]).endswith("named")  # held: may become the stop
            break
    else:
        pytest.fail("premise: the greedy story says 'named'")


def test_stop_gate_holds_partial_prefixes() -> None:
    gate = StopGate(["World", "</s>"])
    assert gate.feed("Hello Wo") == ("Hello ", False)
    assert gate.feed("r") == ("", False)
    assert gate.feed("k!") == ("Work!", False)  # not a stop string after all
    assert gate.feed(" <") == (" ", False)
    assert gate.feed("/s> tail") == ("", True)
    assert gate.flush() == ""
    assert StopGate([]).feed("abc") == ("abc", False)


def test_eos_ends_generation(tiny) -> None:
    model, tok = tiny
    prompt = tok.encode("Once")
    plain = ids_of(run(model, tok, prompt, GREEDY.replace(max_new_tokens=6)))
    assert tok.eos_id not in plain
    # Make EOS the argmax exactly where plain[3] was: its output row becomes plain[3]'s, a bit
    # larger. Earlier steps are unaffected unless plain[3] was their runner-up.
    with torch.inference_mode():
        logit = float(model(torch.tensor([prompt + plain[:3]]))[0, -1, plain[3]])
    biased = Transformer(model.args).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.output.weight[tok.eos_id] = model.output.weight[plain[3]] * (
            1.5 if logit > 0 else 0.5
        )
    steps = run(biased, tok, prompt, GREEDY.replace(max_new_tokens=6))
    assert steps[-1].finish_reason == "eos" and steps[-1].token_id == tok.eos_id
    assert ids_of(steps)[:-1] == plain[: len(steps) - 1]
    assert len(steps) <= 4
    assert text_of(steps) == tok.decode(plain[: len(steps) - 1])


def test_overflow_trims_turns_and_stops_at_context(tiny) -> None:
    model, tok = tiny
    max_len = model.args.max_seq_len  # 128
    dialog = [{"role": "system", "content": "Be kind."}]
    for i in range(4):
        dialog += [
            {"role": "user", "content": f"Tell me story {i}."},
            {"role": "assistant", "content": "Once upon a time there was a cat."},
        ]
    dialog.append({"role": "user", "content": "Another one!"})
    budget = prompt_budget(max_len, 24)
    prompt = encode_dialog(tok, dialog, max_tokens=budget)
    assert prompt.dropped_turns > 0 and len(prompt.ids) <= budget
    assert "Be kind." in prompt.text and "story 0" not in prompt.text
    steps = run(model, tok, prompt, GREEDY.replace(max_new_tokens=500))
    assert "dropped" in (steps[0].notice or "")
    assert steps[-1].finish_reason == "context" and "context window" in steps[-1].notice
    assert steps[-1].position == max_len - 1
    assert len(steps) == max_len - len(prompt.ids)
    with pytest.raises(GenerateError, match="no room"):
        generate(model, tok, [tok.bos_id] * max_len, GREEDY)


def test_cancel_between_tokens_leaves_model_ready(stories) -> None:
    model, tok = stories
    prompt = tok.encode("Once upon a time")
    params = GREEDY.replace(max_new_tokens=30)
    expected = ids_of(run(model, tok, prompt, params))
    cancel = threading.Event()
    got = []
    for step in generate(model, tok, prompt, params, cancel=cancel):
        got.append(step)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 4 and got[-1].finish_reason == "cancelled"
    assert got[-1].token_id == NO_TOKEN and got[-1].position == len(prompt) + 3
    assert ids_of(got) == expected[:3]
    assert text_of(got) == tok.decode(expected[:3])
    assert ids_of(run(model, tok, prompt, params)) == expected  # ready for the next request
    already = threading.Event()
    already.set()
    steps = run(model, tok, prompt, params, cancel=already)
    assert [s.finish_reason for s in steps] == ["cancelled"]


class RecordingProbe:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, model, prompt_ids) -> None:
        self.calls.append(f"begin:{len(prompt_ids)}")

    def on_step(self, step: Step) -> None:
        self.calls.append(f"step:{step.position}")

    def end(self, model) -> None:
        self.calls.append("end")


def test_probe_contract(tiny) -> None:
    model, tok = tiny
    probe = RecordingProbe()
    it = generate(model, tok, [tok.bos_id, 5], GREEDY.replace(max_new_tokens=3), probe=probe)
    assert probe.calls == []  # nothing runs before the first step is asked for
    first = next(it)
    assert probe.calls == ["begin:2", "step:2"] and first.position == 2
    assert [s.position for s in it] == [3, 4]
    assert probe.calls == ["begin:2", "step:2", "step:3", "step:4", "end"]
    # Abandoned early (the consumer closes the stream): end still runs.
    probe = RecordingProbe()
    it = generate(model, tok, [tok.bos_id], GREEDY.replace(max_new_tokens=9), probe=probe)
    next(it)
    it.close()
    assert probe.calls == ["begin:1", "step:1", "end"]


def test_bad_inputs(tiny, stories) -> None:
    model, tok = tiny
    with pytest.raises(GenerateError, match="empty"):
        generate(model, tok, [], GREEDY)
    with pytest.raises(GenerateError, match=r"prompt_ids\[1\]"):
        generate(model, tok, [1, 512], GREEDY)
    with pytest.raises(GenerateError, match=r"prompt_ids\[0\]"):
        generate(model, tok, [-3], GREEDY)
    with pytest.raises(GenerateError, match="params"):
        generate(model, tok, [1], {"temperature": 0})  # type: ignore[arg-type]
    llama_tok = load_tokenizer(shared_file("llama2-tokenizer", "tokenizer.model"))
    with pytest.raises(GenerateError, match="32000 pieces"):
        generate(model, llama_tok, [1], GREEDY)

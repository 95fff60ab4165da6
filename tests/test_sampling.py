"""Sampling: parameters validated, filters checked on known distributions, seeds reproduce."""

from __future__ import annotations

import math

import pytest
import torch

from llama.sampling import (
    SamplingError,
    SamplingParams,
    apply_penalties,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None = None) -> int:
    probs = torch.softmax(process_logits(logits, params), -1)
    return int(sample(probs, gen, greedy=params.greedy))


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(3)
    for _ in range(20):
        logits = torch.randn(100) * 3
        params = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.3)
        assert draw(logits, params) == int(logits.argmax())
        processed = process_logits(logits, params)
        assert kept(processed) == [int(logits.argmax())]


def test_top_k_one_is_greedy() -> None:
    torch.manual_seed(4)
    gen = make_generator(0, torch.device("cpu"))
    for _ in range(20):
        logits = torch.randn(50)
        assert draw(logits, SamplingParams(temperature=1.5, top_p=1.0, top_k=1), gen) == int(
            logits.argmax()
        )


def test_top_k_mask() -> None:
    logits = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(logits, 99)) == [0, 1, 2, 3, 4]


def test_top_p_mask_on_known_distribution() -> None:
    logits = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    assert kept(top_p_filter(logits, 0.4)) == [1]  # 0.4 reaches 0.4
    assert kept(top_p_filter(logits, 0.5)) == [1, 3]  # 0.4 < 0.5, 0.7 reaches it
    assert kept(top_p_filter(logits, 0.75)) == [1, 3, 4]  # 0.7 < 0.75 <= 0.85
    assert kept(top_p_filter(logits, 0.9)) == [0, 1, 3, 4]
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3, 4]
    assert kept(top_p_filter(logits, 0.0)) == [1]  # always at least one token
    peaked = logits_of([0.999, 0.001])
    assert kept(top_p_filter(peaked, 1e-9)) == [0]


def test_min_p_mask_on_known_distribution() -> None:
    logits = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert kept(min_p_filter(logits, 0.5)) == [1, 3]  # >= 0.2
    assert kept(min_p_filter(logits, 0.25)) == [0, 1, 3, 4]  # >= 0.1
    assert kept(min_p_filter(logits, 1.0)) == [1]
    assert kept(min_p_filter(logits, 0.0)) == [0, 1, 2, 3, 4]


def test_filters_compose_and_renormalise() -> None:
    logits = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.75, min_p=0.0)
    probs = torch.softmax(process_logits(logits, params), -1)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    torch.testing.assert_close(probs, expected)


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([1.0, 2.0, 4.0])
    p = SamplingParams(temperature=2.0, top_p=1.0)
    torch.testing.assert_close(process_logits(logits, p), logits / 2)


def test_penalties_as_specified() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 0.0, 3.0, 1.0])
    rep = apply_penalties(logits, seen, None, SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(rep, torch.tensor([1.0, -4.0, 1.0, 0.5]))
    pf = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, seen, counts, pf)
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 1.0 - 0.5 - 0.75, 0.5 - 0.5 - 0.25]))
    assert apply_penalties(logits, seen, counts, SamplingParams()) is logits
    # Penalties change the greedy choice: token 0 is the argmax until penalised.
    greedy = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    probs = torch.softmax(process_logits(logits, greedy, seen, counts), -1)
    assert int(sample(probs, None, greedy=True)) == 2
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_same_seed_same_tokens() -> None:
    logits = torch.randn(300)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123)

    def run(seed: int) -> list[int]:
        gen = make_generator(seed, logits.device)
        return [draw(logits, params, gen) for _ in range(40)]

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_sampling_follows_distribution() -> None:
    logits = logits_of([0.5, 0.3, 0.2])
    gen = make_generator(0, logits.device)
    params = SamplingParams(temperature=1.0, top_p=1.0)
    draws = [draw(logits, params, gen) for _ in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert all(math.isclose(f, p, abs_tol=0.04) for f, p in zip(freq, [0.5, 0.3, 0.2]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 70}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10.0}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"stop": (5,)}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_valid_edges_and_normalisation() -> None:
    p = SamplingParams(temperature=0, top_p=0, min_p=1, seed=0, stop=["</s>", "User:"])
    assert p.stop == ("</s>", "User:") and isinstance(p.temperature, float)
    assert SamplingParams(stop="###").stop == ("###",)
    assert p.replace(temperature=0.7).temperature == 0.7
    with pytest.raises(SamplingError, match=r"^top_k:"):
        p.replace(top_k=-3)
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


def test_choose_is_the_reference_pipeline_greedy_without_softmax():
    from llama.sampling import choose

    torch.manual_seed(0)
    logits = torch.randn(50)
    seen = torch.zeros(50, dtype=torch.bool)
    seen[logits.argmax()] = True  # the penalty moves the argmax elsewhere
    counts = seen.float()
    for params in (SamplingParams(temperature=0.0, repetition_penalty=3.0, presence_penalty=2.0),
                   SamplingParams(temperature=0.0)):
        token, probs = choose(logits, params, None, seen, counts)
        reference = torch.softmax(process_logits(logits, params, seen, counts), -1)
        assert probs is None and int(token) == int(reference.argmax())
        assert (int(token) != int(logits.argmax())) == (params.repetition_penalty > 1)
    params = SamplingParams(temperature=0.7, top_p=0.8, seed=1)
    token, probs = choose(logits, params, make_generator(1, torch.device("cpu")))
    assert torch.allclose(probs, torch.softmax(process_logits(logits, params), -1))
    assert probs[int(token)] > 0

"""Streaming generation: prefill the prompt, then one decode step per token.

`generate(...)` validates its inputs at once (GenerateError) and returns an iterator of
`Step`s, one per sampled token; the last step carries `finish_reason`:
"eos" (the model ended its turn: EOS, or the chat template's end-of-turn token such as
<|im_end|>), "stop" (a stop string appeared; the text ends before it), "length"
(max_new_tokens), "context" (prompt + reply fill max_seq_len: the KV cache is never written
past it) or "cancelled" (the `cancel` event was set; checked between tokens).

Invariants: joined `Step.text` == tokenizer.decode(all generated ids), except that on "stop"
the text ends just before the stop string; a partial stop string is never released (the tail
that could start one is held back until it cannot). The model keeps no per-request state: the
next call overwrites the caches from position 0, so a cancelled or abandoned generation
leaves it ready. One generation at a time per model (the caches are shared).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from llama.chat import Prompt
from llama.model import Transformer
from llama.sampling import SamplingParams, choose, make_generator
from llama.tokenizer import StreamDecoder, Tokenizer

# Sampled ids travel to the host as fp32 with their probability (one transfer): exact below
# 2^24, which every LLaMA-family vocabulary is (32,000 to 256,000).
MAX_VOCAB = 2**24
NO_TOKEN = -1  # token_id of the final step of a cancelled generation (it carries no token)


class GenerateError(ValueError):
    """generate() was given a prompt or model it cannot run (the message says which)."""


@dataclass(frozen=True)
class Candidate:
    """One of the most likely next tokens at a step.

    prob_before: softmax of the raw logits; prob_after: probability under the distribution
    actually sampled (after penalties, temperature, top-k, top-p, min-p; 0 when filtered).
    """

    token_id: int
    piece: str
    prob_before: float
    prob_after: float


@dataclass
class Step:
    """One generated token. `position` is its absolute position (prompt length + index).

    text: the newly released text (may be "" while a character or a possible stop string is
    incomplete). prob: the model's probability of the token (softmax of raw logits).
    top: the n_top most likely tokens by raw probability. elapsed_s: seconds since generate
    started; ttft_s: seconds to the first token (None before it). On a cancelled final step,
    token_id is NO_TOKEN, prob is 0 and top is empty.
    """

    token_id: int
    text: str
    position: int
    prob: float
    top: list[Candidate]
    elapsed_s: float
    ttft_s: float | None
    finish_reason: str | None = None
    notice: str | None = None


class Probe(Protocol):
    def begin(self, model: Transformer, prompt_ids: list[int]) -> None: ...
    def on_step(self, step: Step) -> None: ...
    def end(self, model: Transformer) -> None: ...


def host_positions(n: int, device: torch.device) -> Tensor:
    """Positions 0..n-1 kept on the host for `Transformer.forward`: it reads the cache length
    from them without a device sync, and copies each slice to the device without waiting
    (pinned memory where the device is CUDA)."""
    positions = torch.arange(n)
    return positions.pin_memory() if device.type == "cuda" else positions


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take so the reply gets max_new_tokens (but at most half the
    context is reserved for it, so a long reply setting does not starve the dialog)."""
    return max(1, max_seq_len - min(max_new_tokens, max_seq_len // 2))


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int] | Prompt,
    params: SamplingParams,
    probe: Probe | None = None,
    cancel: threading.Event | None = None,
    n_top: int = 5,
) -> Iterator[Step]:
    """Stream the reply to `prompt_ids` (a Prompt's dropped turns are reported in the first
    step's notice). Calls probe.begin before prefill, probe.on_step for every step before
    yielding it and probe.end when the stream ends, however it ends."""
    ids, notice = _check_inputs(model, tokenizer, prompt_ids, params, n_top)
    return _stream(_Decoder(model, tokenizer, ids, params, n_top), probe, cancel, notice)


def _check_inputs(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int] | Prompt,
    params: SamplingParams,
    n_top: int,
) -> tuple[list[int], str | None]:
    if not isinstance(params, SamplingParams):
        raise GenerateError(f"params: expected SamplingParams, found {type(params).__name__}")
    vocab, max_len = model.args.vocab_size, model.args.max_seq_len
    if tokenizer.vocab_size != vocab:
        raise GenerateError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, the model "
            f"expects vocab_size={vocab}"
        )
    if vocab > MAX_VOCAB:
        raise GenerateError(f"vocab_size: expected at most {MAX_VOCAB}, found {vocab}")
    if not 0 <= n_top <= vocab:
        raise GenerateError(f"n_top: expected an int in [0, {vocab}], found {n_top}")
    notice = _trim_notice(prompt_ids) if isinstance(prompt_ids, Prompt) else None
    ids = list(prompt_ids.ids if isinstance(prompt_ids, Prompt) else prompt_ids)
    if not ids:
        raise GenerateError("prompt_ids: empty (a prompt needs at least BOS)")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise GenerateError(f"prompt_ids[{i}]: expected an int in [0, {vocab}), found {t!r}")
    if len(ids) >= max_len:
        raise GenerateError(
            f"prompt_ids: {len(ids)} tokens leave no room to generate within "
            f"max_seq_len={max_len} (trim it with encode_dialog(max_tokens=...))"
        )
    return ids, notice


def _trim_notice(prompt: Prompt) -> str | None:
    if prompt.dropped_turns:
        return f"dropped the {prompt.dropped_turns} oldest turn(s) to fit the context window"
    if prompt.dropped_tokens:
        return f"dropped the {prompt.dropped_tokens} oldest prompt tokens to fit the context"
    return None


def _stream(
    dec: _Decoder, probe: Probe | None, cancel: threading.Event | None, notice: str | None
) -> Iterator[Step]:
    try:
        if probe is not None:
            probe.begin(dec.model, dec.prompt_ids)
        for step in dec.steps(cancel):
            if notice is not None:
                step.notice = notice if step.notice is None else f"{notice}; {step.notice}"
                notice = None
            if probe is not None:
                probe.on_step(step)
            yield step
    finally:
        if probe is not None:
            probe.end(dec.model)


class StopGate:
    """Holds back text that could still turn into a stop string.

    feed(delta) returns (text safe to release, stopped). A stop string cannot begin inside
    released text: every suffix that is a proper prefix of a stop string stays held.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max(self._held_suffix(s) for s in self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self, stop: str) -> int:
        for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:k]):
                return k
        return 0


@dataclass
class _Pick:
    """Host-side values of one sampled token (read with one device->host transfer)."""

    token_id: int
    prob: float
    top: list[tuple[int, float, float]] = field(default_factory=list)


class _Decoder:
    """State of one generation: device tensors for sampling, text streaming and timing."""

    def __init__(
        self,
        model: Transformer,
        tok: Tokenizer,
        ids: list[int],
        params: SamplingParams,
        n_top: int,
    ) -> None:
        self.model, self.tok, self.prompt_ids, self.params = model, tok, ids, params
        self.n_top = n_top
        self.device = model.tok_embeddings.weight.device
        self.max_len = model.args.max_seq_len
        self.gate = StopGate(params.stop)
        self.stop_ids = tok.stop_ids
        self.text = StreamDecoder(tok)
        self.generator: torch.Generator | None = None
        self.seen: Tensor | None = None
        self.counts: Tensor | None = None
        self.logits: Tensor | None = None
        self.token: Tensor | None = None  # (1,) last sampled id, stays on the device
        self.positions = host_positions(self.max_len, self.device)  # sliced, never rebuilt
        self.one = torch.ones(1, device=self.device)

    def steps(self, cancel: threading.Event | None) -> Iterator[Step]:
        t0 = time.perf_counter()
        ttft: float | None = None
        n = len(self.prompt_ids)
        for i in range(self.params.max_new_tokens):
            pos = n + i
            if cancel is not None and cancel.is_set():
                yield self._cancelled_step(pos, i, time.perf_counter() - t0, ttft)
                return
            pick = self._prefill() if i == 0 else self._decode(pos - 1)
            now = time.perf_counter() - t0
            ttft = now if ttft is None else ttft
            text, reason = self._text_and_reason(pick.token_id, pos, i)
            top = [Candidate(t, self.tok.piece(t), pb, pa) for t, pb, pa in pick.top]
            step = Step(pick.token_id, text, pos, pick.prob, top, now, ttft, reason)
            if reason == "context":
                step.notice = f"the context window of {self.max_len} tokens is full"
            yield step
            if reason is not None:
                return

    def _text_and_reason(self, token_id: int, pos: int, i: int) -> tuple[str, str | None]:
        text, stopped = self.gate.feed(self.text.push(token_id))
        if token_id in self.stop_ids:  # EOS, or the chat template's end of turn
            reason = "eos"
        elif stopped:
            return text, "stop"
        elif i + 1 >= self.params.max_new_tokens:
            reason = "length"
        elif pos + 1 >= self.max_len:
            reason = "context"
        else:
            return text, None
        tail, stopped = self.gate.feed(self.text.flush())
        if stopped:
            return text + tail, "stop"
        return text + tail + self.gate.flush(), reason

    def _cancelled_step(self, pos: int, i: int, now: float, ttft: float | None) -> Step:
        tail, _ = self.gate.feed(self.text.flush())
        text = tail + self.gate.flush()
        note = f"cancelled after {i} token(s)"
        return Step(NO_TOKEN, text, pos, 0.0, [], now, ttft, "cancelled", note)

    @torch.inference_mode()
    def _prefill(self) -> _Pick:
        model, dev = self.model, self.device
        caches, ref = model.caches(), model.tok_embeddings.weight
        if not caches or caches[0].k.device != ref.device or caches[0].capacity < self.max_len:
            model.setup_caches(1)  # absent, or the model moved since they were made
        self.generator = make_generator(self.params.seed, dev)
        vocab = model.args.vocab_size
        if self.params.uses_penalties:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            self.seen[torch.tensor(self.prompt_ids, device=dev)] = True
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=dev)
        tokens = torch.tensor([self.prompt_ids], device=dev)  # (1, T)
        n = len(self.prompt_ids)
        self.logits = model(tokens, input_pos=self.positions[:n], last_only=True)[0, -1]  # (V,)
        return self._pick()

    @torch.inference_mode()
    def _decode(self, pos: int) -> _Pick:
        """Feed the last sampled token at `pos`; pick the token for pos + 1."""
        assert self.token is not None
        tokens = self.token.view(1, 1)  # (1, 1)
        logits = self.model(tokens, input_pos=self.positions[pos : pos + 1], last_only=True)
        self.logits = logits[0, -1]  # (V,)
        return self._pick()

    def _pick(self) -> _Pick:
        """Sample from self.logits; one host transfer for the id, its prob and the top-k.
        (Greedy's distribution is one-hot: prob_after is 1 for the token, 0 for the others.)"""
        logits = self.logits
        assert logits is not None
        token, probs = choose(logits, self.params, self.generator, self.seen, self.counts)
        self.token = token
        if self.seen is not None and self.counts is not None:
            self.seen[token] = True
            self.counts.index_add_(0, token, self.one)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        # Everything the host needs in one transfer (one device sync): ids travel as fp32,
        # exact below MAX_VOCAB (_check_inputs); MPS has no float64.
        values = [token.float(), (logits[token] - lse).exp()]
        if self.n_top:
            top_logits, top_ids = torch.topk(logits, self.n_top)
            after = (top_ids == token).float() if probs is None else probs[top_ids]
            values += [top_ids.float(), (top_logits - lse).exp(), after]
        flat = torch.cat(values).tolist()  # [id, prob, k ids, k before, k after]
        k = self.n_top
        ids = [int(i) for i in flat[2 : 2 + k]]
        top = list(zip(ids, flat[2 + k : 2 + 2 * k], flat[2 + 2 * k :], strict=True))
        return _Pick(int(flat[0]), flat[1], top)


def generate_text(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int] | Prompt, **kw: Any
) -> tuple[str, str | None]:
    """Convenience: the whole reply text and its finish reason (for scripts and tests)."""
    params = kw.pop("params", None) or SamplingParams(**kw)
    parts, reason = [], None
    for step in generate(model, tokenizer, prompt_ids, params):
        parts.append(step.text)
        reason = step.finish_reason
    return "".join(parts), reason

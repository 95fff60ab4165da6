"""The loaded model as the playground sees it: model + tokenizer + one generation slot.

A `Runtime` is built once per process (app.py) and shared by every browser session. It owns no
per-user data: chats, settings and traces live in each session's gradio State. What it does
own is the model's mutable KV cache, so at most one generation runs at a time: the layout puts
every event that touches the model in one gradio concurrency group (`concurrency_id`, limit
1), and `Runtime.slot` is a lock held for the whole of a generation, so direct callers (tests,
scripts) are serialised too.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llama.checkpoints import CheckpointError, LoadedModel, load
from llama.config import ModelArgs
from llama.model import Transformer
from llama.tokenizer import Tokenizer, TokenizerError

Template = Literal["chat", "completion"]
TEMPLATES: dict[str, str] = {"chat": "Llama-2-chat", "completion": "Raw completion"}

# Example prompts by (template, model size). Small models are the TinyStories kind: they know
# simple stories and nothing else, so they get story requests.
_EXAMPLES: dict[tuple[str, bool], list[str]] = {
    ("chat", True): [
        "Write a story about a dog named Max.",
        "Tell me a story with the words ball, happy and park.",
        "Write a story about a cat who is afraid of the rain.",
        "Tell me a short story about a little girl and her red kite.",
    ],
    ("chat", False): [
        "Explain rotary position embeddings in three sentences.",
        "Write a haiku about a key-value cache.",
        "What is the difference between multi-head and grouped-query attention?",
        "Give me three tips for a good night's sleep.",
    ],
    ("completion", True): [
        "Once upon a time",
        "One day, a little boy named Tim",
        "The sun was shining and the birds",
    ],
    ("completion", False): [
        "The capital of France is",
        "Simply put, the theory of relativity states that",
        "A recipe for pancakes:\n1.",
    ],
}
SMALL_MODEL_PARAMS = 100_000_000


@dataclass
class Runtime:
    """One loaded model shared by all sessions. `slot` serialises generations."""

    model: Transformer
    tokenizer: Tokenizer
    name: str
    path: Path
    format: str
    device: torch.device
    dtype: torch.dtype
    load_in_8bit: bool
    default_template: Template = "completion"
    slot: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def concurrency_id(self) -> str:
        """The gradio concurrency group of every event that runs this model."""
        return f"model-{id(self.model):x}"

    @property
    def max_seq_len(self) -> int:
        return self.args.max_seq_len

    @property
    def ranks(self) -> int:
        """Processes the model is split over (tensor parallelism under torchrun; else 1)."""
        tp = getattr(self.model, "tp", None)
        return tp.world_size if tp is not None else 1

    def examples(self, template: str) -> list[str]:
        """Example prompts suited to this model and template."""
        small = self.args.n_params() < SMALL_MODEL_PARAMS
        return list(_EXAMPLES[("chat" if template == "chat" else "completion", small)])

    def describe(self) -> str:
        """One line: name, shape, device, dtype, 8-bit (the status line's model part)."""
        a = self.args
        kind = a.attention_kind
        heads = f"{a.n_heads} heads" if kind == "MHA" else f"{a.n_heads} heads / {a.kv_heads} KV"
        dtype = str(self.dtype).removeprefix("torch.")
        eight = "8-bit on" if self.load_in_8bit else "8-bit off"
        device = str(self.device) if self.ranks == 1 else f"{self.device} × {self.ranks} ranks"
        params = format_count(a.n_params(tied=self.model.output_tied))  # a tied output counts once
        return (
            f"{self.name} · {params} params · dim {a.dim} · "
            f"{a.n_layers} layers · {heads} ({kind}) · vocab {a.vocab_size} · "
            f"ctx {a.max_seq_len} · {device} · {dtype} · {eight}"
        )

    def kv_bytes(self, positions: int, per_rank: bool = False) -> int:
        """Bytes of the KV cache holding `positions` positions, over all layers: over all
        ranks (the memory really used, replicated KV heads counted), or on each rank."""
        from llama.parallel.runtime import kv_cache_bytes

        kv = kv_cache_bytes(self.model, positions)
        return kv.per_rank if per_rank else kv.total


def format_count(n: int) -> str:
    """1234 -> "1.2K", 6_738_415_616 -> "6.74B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{unit}"
    return str(n)


def detect_template(path: Path) -> Template:
    """The template a checkpoint asks for: "chat" for a chat model, else "completion".

    The evidence is read from files, never from the directory's name: a Hugging Face
    tokenizer_config.json with a `chat_template`, or a params.json / config.json whose
    `chat_template` names the Llama-2 chat format (the shipped model's params.json does).
    """
    root = path if path.is_dir() else path.parent
    for name in ("tokenizer_config.json", "params.json", "config.json"):
        raw = _read_json(root / name)
        if raw.get("chat_template"):
            return "chat"
    return "completion"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def from_loaded(loaded: LoadedModel, template: str | None = None) -> Runtime:
    """Wrap a LoadedModel (llama.checkpoints.load) as a Runtime with its KV cache set up.

    template: "chat", "completion", or None/"auto" to detect it from the files.
    """
    if loaded.tokenizer_path is None:
        raise CheckpointError(
            f"{loaded.path}: no tokenizer found (expected tokenizer.model beside the weights; "
            "pass --tokenizer PATH)"
        )
    try:
        tokenizer = Tokenizer(loaded.tokenizer_path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if template in (None, "auto"):
        template = detect_template(loaded.path)
    if template not in TEMPLATES:
        choices = ", ".join(["auto", *TEMPLATES])
        raise ValueError(f"template: expected one of {choices}, found {template!r}")
    loaded.model.setup_caches(1)
    name = loaded.path.stem if loaded.path.is_file() else loaded.path.name
    return Runtime(
        loaded.model,
        tokenizer,
        name,
        loaded.path,
        loaded.format,
        loaded.device,
        loaded.dtype,
        loaded.load_in_8bit,
        template,
    )  # type: ignore[arg-type]


def load_runtime(
    path: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
    max_seq_len: int | None = None,
    tokenizer_path: str | Path | None = None,
    template: str | None = None,
    progress: bool = True,
    weights: str | None = None,
) -> Runtime:
    """Load a checkpoint (any format llama.checkpoints knows) into a Runtime.

    Raises CheckpointError (a clear message naming the file) for a bad path or checkpoint.
    """
    loaded = load(
        path,
        device=device,
        dtype=dtype,
        load_in_8bit=load_in_8bit,
        max_seq_len=max_seq_len,
        tokenizer_path=tokenizer_path,
        progress=progress,
        weights=weights,
    )
    return from_loaded(loaded, template)

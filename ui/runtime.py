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
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.assets import SHIPPED_MODEL_DIR
from llama.checkpoints import CheckpointError, LoadedModel, load
from llama.config import ModelArgs
from llama.int8 import Int8Linear
from llama.model import Transformer
from llama.tokenizer import Tokenizer, TokenizerError, open_tokenizer
from llama.tokenizer.template import describe as template_kind

# "own": the checkpoint's Jinja template; "chat": Meta's Llama-2-chat rules; "completion": raw.
TEMPLATES: dict[str, str] = {
    "own": "The model's own",
    "chat": "Llama-2-chat",
    "completion": "Raw completion",
}  # the keys of llama.chat.TEMPLATES

# Example prompts by (kind, model size). Small models are the TinyStories kind: they know
# simple stories and nothing else, so they get story requests.
_EXAMPLES: dict[tuple[str, bool], list[str]] = {
    ("chat", True): [
        "Write a story about a dog named Max.",
        "Tell me a story with the words ball, happy and park.",
        "Write a story about a cat who is afraid of the rain.",
        "Tell me a short story about a little girl and her red kite.",
    ],
    ("chat", False): [
        "What is the capital of France?",
        "Give me three tips for a good night's sleep.",
        "Write a haiku about the sea.",
        "Explain in two sentences what a neural network is.",
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
    default_template: str = "completion"
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

    @property
    def small(self) -> bool:
        """A TinyStories-kind model: it writes simple stories, nothing else."""
        return self.args.n_params() < SMALL_MODEL_PARAMS

    def examples(self, template: str) -> list[str]:
        """Example prompts suited to this model and template."""
        return list(_EXAMPLES[("completion" if template == "completion" else "chat", self.small)])

    @property
    def default_max_new_tokens(self) -> int:
        """Room for a short story (small models) or a full answer (chat models)."""
        return 128 if self.small else 256

    def template_choices(self) -> list[tuple[str, str]]:
        """(label, value) of the templates this model offers; "own" names the detected kind."""
        out = []
        for key, label in TEMPLATES.items():
            if key == "own":
                if self.tokenizer.chat_template is None:
                    continue
                label = f"{label} ({template_kind(self.tokenizer)})"
            out.append((label, key))
        return out

    def about(self) -> str:
        """What this model can and cannot do, said plainly (the chat's first line)."""
        if self.path.resolve() == SHIPPED_MODEL_DIR.resolve():
            return (
                "This is the shipped 3.1M-parameter story model: it writes short, simple "
                "children's stories (try the examples). It cannot answer questions, follow "
                "other instructions, know facts or do sums; for that, load a chat model "
                "(`python app.py --model smollm2`)."
            )
        if self.small:
            return "A tiny model: expect simple story-like text, not facts or answers."
        if self.default_template == "completion":
            return "A base model: it continues the text you type."
        return "A chat model: ask it a question."

    def describe(self) -> str:
        """One line: name, shape, device, dtype, 8-bit or int8 (the status line's model part)."""
        a = self.args
        kind = a.attention_kind
        heads = f"{a.n_heads} heads" if kind == "MHA" else f"{a.n_heads} heads / {a.kv_heads} KV"
        dtype = str(self.dtype).removeprefix("torch.")
        eight = "8-bit on" if self.load_in_8bit else "8-bit off"
        if any(type(m) is Int8Linear for m in self.model.modules()):
            eight = "int8 weights"  # ours (--weights int8), not bitsandbytes' 8-bit
        device = str(self.device) if self.ranks == 1 else f"{self.device} × {self.ranks} ranks"
        out = self.model.output
        tied = self.model.output_tied or (type(out) is Int8Linear and out.embedding_copy)
        params = format_count(a.n_params(tied=tied))  # a tied output counts once
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


def detect_template(path: Path, tokenizer: Tokenizer | None = None) -> str:
    """The template a checkpoint asks for: "own" when its tokenizer carries a Jinja chat
    template (GGUF, tokenizer_config.json), "chat" (Meta's Llama-2-chat rules) when a
    params.json / config.json names the Llama-2 chat format (the shipped model's params.json
    does), else "completion". Read from files, never from the directory's name.
    """
    if tokenizer is not None and tokenizer.chat_template is not None:
        return "own"
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

    template: "own", "chat", "completion", or None/"auto" to detect it from the files.
    """
    if loaded.tokenizer_path is None:
        raise CheckpointError(
            f"{loaded.path}: no tokenizer found (expected tokenizer.model or tokenizer.json "
            "beside the weights; pass --tokenizer PATH)"
        )
    try:
        tokenizer = open_tokenizer(loaded)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if template in (None, "auto"):
        template = detect_template(loaded.path, tokenizer)
    if template == "own" and tokenizer.chat_template is None:
        raise ValueError(f"template: {loaded.path} carries no chat template of its own")
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
    )


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

    Without max_seq_len the context is the checkpoint's, shortened (with a notice on stderr)
    to the longest that fits the device's free memory. Raises CheckpointError (a clear
    message naming the file) for a bad path or checkpoint, or a model that cannot fit.
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
        fit_context=True,
    )
    if loaded.notice:
        print(f"{loaded.path.name}: {loaded.notice}", file=sys.stderr, flush=True)
    return from_loaded(loaded, template)

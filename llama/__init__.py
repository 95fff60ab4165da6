"""A from-scratch LLaMA-2 runtime: model, checkpoint loaders, tokenizer, chat, sampling.

The package's names load on first use (PEP 562), so `python -m llama --help` starts without
importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "ModelArgs", "Transformer"]


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "ModelArgs"):
        from llama import config

        return getattr(config, name)
    if name == "Transformer":
        from llama.model import Transformer

        return Transformer
    raise AttributeError(f"module 'llama' has no attribute {name!r}")

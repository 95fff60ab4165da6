"""A from-scratch LLaMA-2 runtime: model, checkpoint loaders, tokenizer, chat, sampling."""

from llama.config import ConfigError, ModelArgs
from llama.model import Transformer

__all__ = ["ConfigError", "ModelArgs", "Transformer"]

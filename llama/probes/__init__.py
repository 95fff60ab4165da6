"""Opt-in capture for the live views; costs nothing when no probe is attached.

capture.py (`Probe`: attaches to the model during generate() and records attention rows, RoPE
rotations and the KV cache) and views.py (`Trace` and its parts: the immutable snapshot that
ui/figures.py draws). views.py imports nothing from capture.py.
"""

from llama.probes.capture import Probe
from llama.probes.views import LayerAttention, Trace, token_label

__all__ = ["LayerAttention", "Probe", "Trace", "token_label"]

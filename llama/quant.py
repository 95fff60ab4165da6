"""8-bit weights (LLM.int8, Dettmers et al. 2022) via bitsandbytes' Linear8bitLt.

Every nn.Linear inside the transformer blocks (wq, wk, wv, wo, w1, w2, w3) becomes a
Linear8bitLt holding int8 weights with one fp32 scale per output row; activations columns
above `threshold` go through an fp16/fp32 side path. Embeddings, norms and the output stay in
the model dtype. Quantisation happens one tensor at a time as the checkpoint streams in, so a
full-precision copy of the model never exists in RAM.

bitsandbytes 0.50 runs this on CPU as well as CUDA. It saves memory, not time: on CPU an
int8 matvec is several times slower than fp32. Activations enter every int8 product as fp16
(bitsandbytes casts anything else there, at every product): on CUDA an 8-bit model is
loaded in fp16 by default (llama.checkpoints.default_dtype).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from llama.model import Transformer

THRESHOLD = 6.0  # LLM.int8's outlier threshold (the paper's and bitsandbytes' default)
INSTALL_HINT = "pip install bitsandbytes"


class QuantisationUnavailableError(ImportError):
    """8-bit was asked for but bitsandbytes cannot be imported."""


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or an error that says how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise QuantisationUnavailableError(
            f"load_in_8bit=True needs the bitsandbytes package, which is not importable "
            f"({exc}). Install it with: {INSTALL_HINT}"
        ) from None


def quantise_weight(
    weight: Tensor, device: torch.device, threshold: float = THRESHOLD
) -> nn.Module:
    """A Linear8bitLt on `device` whose int8 weights are quantised from `weight` (out, in).

    Quantised on `device` from an fp16 copy, the dtype bitsandbytes' own route (Int8Params
    moved from the CPU) casts to first: the same int8 values and scales, with no fp32 copy
    and, for a weight already on the GPU (tensor parallelism), no trip through the host.
    """
    bnb = bitsandbytes()
    _quiet_cast_notice()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                threshold=threshold, device="meta")
    half = weight.detach().to(device=device, dtype=torch.float16)
    int8, scales, _ = bnb.functional.int8_vectorwise_quant(half)
    param = bnb.nn.Int8Params(int8, requires_grad=False, has_fp16_weights=False)
    param.CB, param.SCB = int8, scales  # what Int8Params holds once quantised
    layer.weight = param
    return layer


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs on every fp32/bf16 matmul that activations go through fp16 (that is
    how LLM.int8 works); once per token per layer it drowns everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _quiet_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


def is_block_linear(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of an nn.Linear inside a transformer block."""
    if not name.startswith("layers.") or not name.endswith(".weight"):
        return False
    return type(model.get_submodule(name.removesuffix(".weight"))) is nn.Linear


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    if isinstance(model, Transformer):
        model.invalidate_routes()


def make_quantiser(device: torch.device) -> Callable[[nn.Module, str, Tensor], bool]:
    """For checkpoints.assemble: quantise block Linear weights as they arrive.

    The returned function gets (model, name, tensor as read) and returns True when it
    consumed the tensor. Fails at once (not mid-load) when bitsandbytes is missing.
    """
    bitsandbytes()

    def quantise(model: nn.Module, name: str, tensor: Tensor) -> bool:
        if not is_block_linear(model, name):
            return False
        replace_module(model, name.removesuffix(".weight"), quantise_weight(tensor, device))
        return True

    return quantise


def quantise_model(model: nn.Module) -> nn.Module:
    """Swap the block Linears of an already-loaded model for 8-bit ones, in place."""
    names = [n for n, _ in model.named_parameters() if is_block_linear(model, n)]
    for name in names:
        path = name.removesuffix(".weight")
        weight = model.get_parameter(name).detach()
        layer = quantise_weight(weight, weight.device)
        # Linear8bitLt computes differently in training mode: keep the model's mode.
        layer.train(model.get_submodule(path).training)
        replace_module(model, path, layer)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and the int8 layers' row scales (SCB, which bitsandbytes
    moves from the weight to the layer state on the first forward), counting shared (tied)
    storage once."""
    scales = []
    for m in model.modules():
        weight = getattr(m, "weight", None)
        scales += [getattr(weight, "SCB", None), getattr(getattr(m, "state", None), "SCB", None)]
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *scales]:
        if t is None or t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

"""What drove a token: which earlier positions the model drew on when it produced it.

Two methods, named in every figure that shows them:
- attention x value norm (Kobayashi et al. 2020, "Attention is not only a weight"): for the
  query that produced the token, each head's attention weight on key j times the norm of
  value j, summed over heads and normalised per layer, then averaged over layers. It reads
  only what decoding already holds (the query row and the cached values): free to compute.
- gradient x input (Shrikumar et al. 2016; Denil et al. 2014): d log p(token) / d embedding
  of each earlier position, dotted with that embedding. One backward pass over the prefix, on
  demand, for models small enough (split over ranks too: the collectives have a backward,
  llama/parallel/comm.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

ATTENTION_METHOD = "attention × ‖value‖ (Kobayashi et al. 2020), heads summed, layers averaged"
GRADIENT_METHOD = "gradient × input (embedding · ∂ log p / ∂ embedding)"
GRAD_MAX_PARAMS = 2_000_000_000  # a backward over the prefix holds every activation


class AttributionError(ValueError):
    """Gradient x input cannot run for this model or position (the message says why)."""


def value_norms(values: Tensor) -> Tensor:
    """‖v_j‖ per KV head: values (H_kv, T_kv, D) -> (H_kv, T_kv) fp32."""
    return torch.linalg.vector_norm(values.float(), dim=-1)


def attention_value_rows(probs: Tensor, norms: Tensor) -> Tensor:
    """One layer's attribution of one query: probs (H, T_kv), norms (H_kv, T_kv) -> (T_kv,)
    summing to 1 (query head h reads KV head h // n_rep, as in attention itself)."""
    n_heads, n_kv = probs.shape[0], norms.shape[0]
    weighted = probs.view(n_kv, n_heads // n_kv, -1) * norms[:, None, :]  # (H_kv, n_rep, T_kv)
    total = weighted.sum((0, 1))  # (T_kv,)
    return total / total.sum().clamp_min(1e-30)


def combine_layers(rows: Tensor) -> Tensor:
    """(L, T_kv) per-layer attributions -> (T_kv,) their mean (each layer counts the same)."""
    return rows.mean(0)


def grad_x_input(model: nn.Module, ids: Sequence[int], target: int) -> Tensor:
    """Gradient x input for the token ids[target] given ids[:target]: (target,) fp32 scores,
    one per earlier position (positive: pushed the token up). One uncached forward and one
    backward; the model's weights get no gradients and its KV cache is not touched. A model
    split over ranks runs both on every rank (llama/parallel/model.py)."""
    _check_grad(model, ids, target)
    tp = getattr(model, "tp", None)
    if tp is not None and tp.distributed:
        return model.grad_x_input(list(ids), target)
    return embedding_gradient(model, ids, target, lambda t: model(t, last_only=True), True)


def embedding_gradient(
    model: nn.Module,
    ids: Sequence[int],
    target: int,
    forward: Callable[[Tensor], Tensor],
    leader: bool,
) -> Tensor:
    """grad_x_input's pass with `forward(tokens) -> (1, 1, V) logits`. leader: this process
    holds the loss (a tensor-parallel worker only passes gradients on; its result is
    meaningless)."""
    captured: list[Tensor] = []

    def leaf(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        out = out.detach().float().requires_grad_()  # (1, T, dim): the inputs we attribute
        captured.append(out)
        return out.to(model.tok_embeddings.weight.dtype)

    frozen = [p for p in model.parameters() if p.requires_grad]
    hook = model.tok_embeddings.register_forward_hook(leaf)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            tokens = torch.tensor([list(ids[:target])], device=model.tok_embeddings.weight.device)
            logits = forward(tokens)[0, -1]  # (V,) predicts position `target`
            if leader:
                loss = torch.log_softmax(logits.float(), dim=-1)[ids[target]]
            else:  # the gradient reaching this rank's logits comes from rank 0's loss
                loss = logits.sum() * 0
            (grad,) = torch.autograd.grad(loss, captured[0])
    finally:
        hook.remove()
        for p in frozen:
            p.requires_grad_(True)
    return (grad * captured[0].detach())[0].sum(-1).cpu()  # (T,)


def _check_grad(model: nn.Module, ids: Sequence[int], target: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > GRAD_MAX_PARAMS:
        raise AttributionError(
            f"gradient x input: the model has {n_params:,} parameters; at most "
            f"{GRAD_MAX_PARAMS:,} are allowed (a backward holds every activation)"
        )
    if not 1 <= target < len(ids):
        raise AttributionError(
            f"gradient x input: target position expected in 1..{len(ids) - 1}, found {target}"
        )

"""Rotary position embeddings (Su et al. 2021, "RoFormer"), as Meta's LLaMA applies them.

Each head vector of size D is read as D/2 interleaved pairs (x0, x1), (x2, x3), ...; pair i at
position m is rotated by the angle m * theta_i with theta_i = rope_theta ** (-2i / D).
Tables are kept in fp32 whatever the model dtype (Meta computes the rotation in fp32 too).

The same rotation is written three ways that must agree (tests/test_rope.py):
- `apply_rope`: element-wise on pairs, the fast path used by the model;
- `apply_rope_complex`: multiplication by e^{i m theta}, Meta's reference formulation;
- `apply_rope_matrix`: a block-diagonal 2x2 rotation matrix per position, the textbook form.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Tensor:
    """theta_i for i in [0, D/2): shape (D/2,), fp32, radians per position."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """m * theta_i for every position m: shape (len(positions), D/2), fp32."""
    return torch.outer(positions.to(torch.float32), rope_frequencies(head_dim, theta))


def rope_tables(max_seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles for positions 0..max_seq_len-1: (S, D/2) each."""
    angles = rope_angles(torch.arange(max_seq_len), head_dim, theta)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, T, H, D) by per-position cos/sin (T, D/2).

    Computed in fp32 and cast back to x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[:, None, :]  # (T, 1, D/2), broadcasts over batch and heads
    sin = sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, T, H, D)


def apply_rope_complex(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Meta's formulation: view pairs as complex numbers and multiply by e^{i m theta_i}."""
    head_dim = x.shape[-1]
    rotors = torch.polar(torch.ones(()), rope_angles(positions, head_dim, theta))  # (T, D/2)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, D/2)
    out = torch.view_as_real(xc * rotors[:, None, :])
    return out.flatten(-2).type_as(x)


def rotation_matrix(position: int, head_dim: int, theta: float = 10000.0) -> Tensor:
    """R_m: the (D, D) block-diagonal rotation for position m, fp32."""
    angles = rope_angles(torch.tensor([position]), head_dim, theta)[0]
    c, s = torch.cos(angles), torch.sin(angles)
    blocks = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # (D/2, 2, 2)
    return torch.block_diag(*blocks)


def apply_rope_matrix(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Textbook form: x_m @ R_m^T for each position (slow, for checking and teaching)."""
    head_dim = x.shape[-1]
    mats = torch.stack([rotation_matrix(int(m), head_dim, theta) for m in positions])  # (T, D, D)
    out = torch.einsum("tij,bthj->bthi", mats, x.float())
    return out.type_as(x)


def complex_rope(device: torch.device) -> bool:
    """Whether the eager path rotates with complex64 rotors on `device` (one complex multiply).
    MPS gets the real (cos, sin) form: its complex support is partial and untested here."""
    return device.type != "mps"

"""Reference selective scan: the plain sequential S6 recurrence.

This is the oracle the fast backends are tested against. It loops over positions in Python, so it is
slow, but it is easy to read and runs in float64 when given float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the state is never kept in half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """Δ = softplus(delta + bias) in the compute dtype (bias first, then softplus)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def expand_groups(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(batch, K, N, L) → (batch, K*C, N, L): every channel of group k sees that group's B or C."""
    batch, groups, state, length = x.shape
    per_group = channels // groups
    return x[:, :, None].expand(batch, groups, per_group, state, length).reshape(batch, channels, state, length)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Sequential selective scan. Shapes: u, delta (b, KC, L); A (KC, N); B, C (b, K, N, L).

    Returns y (b, KC, L) in float32, or float64 when any input is float64. Differentiable by autograd.
    """
    dtype = compute_dtype(u, delta, A, B, C)
    channels = u.shape[1]
    dt = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    u_c = u.to(dtype)
    A_c = A.to(dtype)
    B_c = expand_groups(B.to(dtype), channels)
    C_c = expand_groups(C.to(dtype), channels)
    h = u_c.new_zeros(u.shape[0], channels, A.shape[1])
    outputs = []
    for t in range(u.shape[2]):
        decay = torch.exp(dt[:, :, t, None] * A_c)
        h = decay * h + (dt[:, :, t] * u_c[:, :, t])[:, :, None] * B_c[:, :, :, t]
        outputs.append((h * C_c[:, :, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else u_c.new_zeros(u.shape)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c
    return y

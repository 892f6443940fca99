"""Route-aware selective scan: the step towards a fused SS2D core (opt-in, not wired by default).

The cross2d routes are two distinct sequences (row-major and column-major flattenings of the map)
and their reverses; bidi is one sequence and its reverse. Instead of materialising four copies with
``cross_scan`` (and flipping twice), ``selective_scan_routes`` takes the ``nseq`` distinct sequences
once and lets routes k >= nseq walk sequence k - nseq backwards inside the kernel (descending
addresses, still coalesced). Per-route delta / B / C and the output stay in *sequence* order, so the
per-route projections can be computed on the un-flipped sequences and the merge is a plain sum.

Shapes: u (batch, nseq*C, L); delta (batch, 2*nseq*C, L); A (2*nseq*C, N); B, C (batch, 2*nseq, N, L);
D, delta_bias (2*nseq*C). Output y (batch, 2*nseq*C, L) float32, sequence order.

``route_sequences`` / ``merge_routes`` build the sequences from a map and fold the outputs back.
Correctness is tested against the reference (tests/test_triton_selective_scan.py, interpreter). A
first version (per-element reversed addressing) was checked on an H200: correct, forward at par
with cross_scan -> scan -> cross_merge, backward ~1.6x slower because the reversed addressing
defeated 16-byte loads. Reversed routes now run in their own constexpr-specialised launch (REV)
that keeps tiles in ascending address order and scans them backwards (128-bit loads/stores in the
SASS, like the plain kernel); that version is not yet timed on a GPU, so the mode stays opt-in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .selective_scan import selective_scan_bwd, selective_scan_fwd

__all__ = ["selective_scan_routes", "route_sequences", "merge_routes"]

_NSEQ = {"cross2d": 2, "bidi": 1}


@torch.library.custom_op("vmamba::triton_scan_routes_fwd", mutates_args=())
def _routes_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                delta_bias: Tensor | None, delta_softplus: bool, nseq: int) -> Tensor:
    return selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nseq=nseq)


@_routes_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, nseq):
    return delta.new_empty(delta.shape, dtype=torch.float32)


@torch.library.custom_op("vmamba::triton_scan_routes_bwd", mutates_args=())
def _routes_bwd(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                delta_bias: Tensor | None, delta_softplus: bool, nseq: int) -> list[Tensor]:
    grads = selective_scan_bwd(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, nseq=nseq)
    inputs = (u, delta, A, B, C, D, delta_bias)
    return [g.to(x.dtype).contiguous() if x is not None else u.new_empty(0) for g, x in zip(grads, inputs)]


@_routes_bwd.register_fake
def _(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, nseq):
    inputs = (u, delta, A, B, C, D, delta_bias)
    return [torch.empty_like(x) if x is not None else u.new_empty(0) for x in inputs]


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, nseq = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.delta_softplus, ctx.nseq = delta_softplus, nseq


def _backward(ctx, grad_out):
    u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    grads = _routes_bwd(grad_out.contiguous(), u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, ctx.nseq)
    d_u, d_delta, d_A, d_B, d_C, d_D, d_bias = grads
    return (d_u, d_delta, d_A, d_B, d_C, d_D if D is not None else None,
            d_bias if delta_bias is not None else None, None, None)


_routes_fwd.register_autograd(_backward, setup_context=_setup)


def selective_scan_routes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          delta_bias: Tensor | None = None, delta_softplus: bool = True, nseq: int = 2) -> Tensor:
    """Selective scan of 2*nseq routes over nseq sequences (route k >= nseq = sequence k-nseq reversed).

    Equals scanning the materialised routes (sequence, then its reverse) with :func:`selective_scan`
    and flipping the reversed routes' outputs back to sequence order. Differentiable in every input.
    """
    if nseq < 1:
        raise ValueError("nseq must be >= 1")
    return _routes_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), int(nseq))


def route_sequences(x: Tensor, mode: str = "cross2d", channel_last: bool = False) -> Tensor:
    """The distinct sequences of ``mode``: (B, nseq, C, H*W) — row-major (and column-major for cross2d)."""
    mode = getattr(mode, "value", mode)
    if mode not in _NSEQ:
        raise ValueError(f"route_sequences supports {sorted(_NSEQ)}, got {mode!r}")
    x = x.permute(0, 3, 1, 2) if channel_last else x
    rows = x.flatten(2)
    if mode == "bidi":
        return rows[:, None]
    return torch.stack((rows, x.transpose(2, 3).flatten(2)), dim=1)


def merge_routes(y: Tensor, height: int, width: int, mode: str = "cross2d", channel_last: bool = False) -> Tensor:
    """Fold route outputs in sequence order, (B, 2*nseq, C, H*W), back to the summed map."""
    mode = getattr(mode, "value", mode)
    nseq = _NSEQ[mode]
    batch, _, channels, _ = y.shape
    rows = y[:, 0] + y[:, nseq]
    if mode == "cross2d":
        cols = (y[:, 1] + y[:, 3]).view(batch, channels, width, height).transpose(2, 3)
        out = rows.view(batch, channels, height, width) + cols
    else:
        out = rows.view(batch, channels, height, width)
    return out.permute(0, 2, 3, 1) if channel_last else out

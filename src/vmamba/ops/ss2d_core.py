"""Fused SS2D scan core: per-route projections + K-route selective scan of a map, in pixel order.

:func:`ss2d_core` computes, for every route k of a scan mode, the selective scan of the activated
map along that route with route k's projections (x → Δ, B, C; Δ-projection), A, D and Δ-bias, and
returns the K outputs mapped back to pixel positions, (K, B, H, W, C); their sum over K is the merged
SS2D scan output. It equals ``cross_scan`` → per-route projections → ``selective_scan`` →
``cross_merge`` (without the final sum) and is what :class:`vmamba.layers.SS2D` uses on CUDA.

The Triton kernels (:mod:`vmamba.ops.triton.ss2d_core`) read the map along every route in place, never
materialise route-ordered copies, and recompute the projections in the backward instead of saving
them; when a backward will follow, the forward saves the scan state every few steps (float32, one
value per channel, route, state and chunk) so that the backward need not re-run the recurrence. Two
``torch.library`` custom ops (forward, backward) with fake implementations keep it one opaque node for
``torch.compile``; eager calls skip the custom-op dispatch (:mod:`vmamba.ops._eager`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._eager import compiling, eager_function
from ._toggle import Toggle
from .cross_scan import ScanMode

__all__ = ["fused_core_enabled", "ss2d_core", "use_fused_core", "FUSED_MODES"]

FUSED_MODES = {ScanMode.CROSS2D: 2, ScanMode.BIDI: 1, ScanMode.UNIDI: 1}  # mode → distinct visiting orders
_FUSED = Toggle()
# Shortest route (pixels) whose chunk states the forward saves for the backward. H200, VMamba-T:
# saving paid 1.2 ms per layer at 3136 steps and broke even at 196 (BENCHMARKS.md).
SAVE_STATES_MIN_LENGTH = 512


def fused_core_enabled() -> bool:
    """Whether SS2D uses the fused core on CUDA (default True; see :func:`use_fused_core`)."""
    return _FUSED.enabled


def use_fused_core(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Switch the fused core on or off inside a block (benchmarks compare it with the composition)."""
    return _FUSED.scoped(enabled)


def _kernels():
    from .triton import ss2d_core as kernels  # Triton is optional: imported on first use

    return kernels


def _projections(x: Tensor, x_proj_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(u (B, L, C), xp (B, L, K, R + 2N)): the map as rows and every route's projections of every pixel."""
    batch, height, width, channels = x.shape
    routes, width_proj, _ = x_proj_weight.shape
    u = x.reshape(batch, height * width, channels)
    xp = torch.matmul(u, x_proj_weight.to(x.dtype).reshape(routes * width_proj, channels).t())
    return u, xp.view(batch, height * width, routes, width_proj)


def _core_fwd_impl(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor, D: Tensor | None,
                   delta_bias: Tensor, nseq: int, save_states: bool) -> tuple[Tensor, Tensor]:
    batch, height, width, channels = x.shape
    u, xp = _projections(x, x_proj_weight)
    y, states = _kernels().ss2d_scan_fwd(u, xp, dt_projs_weight, A, D, delta_bias, height, width, nseq,
                                         save_states=save_states)
    return y.view(-1, batch, height, width, channels), states


_core_fwd = torch.library.custom_op("vmamba::ss2d_core_fwd", _core_fwd_impl, mutates_args=())


@_core_fwd.register_fake
def _(x, x_proj_weight, dt_projs_weight, A, D, delta_bias, nseq, save_states):
    batch, height, width, channels = x.shape
    routes = dt_projs_weight.shape[0]
    shape = (_kernels().saved_states_shape(batch, routes, channels, height * width, A.shape[1]) if save_states
             else (0,))
    return x.new_empty(routes, *x.shape), x.new_empty(shape, dtype=torch.float32)


def _core_bwd_impl(grad_y: Tensor, x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor,
                   D: Tensor | None, delta_bias: Tensor, states: Tensor, nseq: int) -> list[Tensor]:
    batch, height, width, channels = x.shape
    routes, rank = dt_projs_weight.shape[0], dt_projs_weight.shape[2]
    rows = batch * height * width
    # the weights in the map's dtype, cast once for the recomputed projections and the gradient GEMMs
    x_proj_w, dt_proj_w = x_proj_weight.to(x.dtype), dt_projs_weight.to(x.dtype)
    u, xp = _projections(x, x_proj_w)
    grad_y = grad_y.view(routes, batch, height * width, channels)
    du, ddelta, dbc, dA, dD, dbias = _kernels().ss2d_scan_bwd(
        grad_y, u, xp, dt_proj_w, A, D, delta_bias, height, width, nseq, states=states)
    # Δ = dt_proj_k · xp[..., k, :R]: its two gradients are batched GEMMs over the routes.
    d_dt_low = torch.bmm(ddelta.view(routes, rows, channels), dt_proj_w)
    # dW_k = Σ_pixels ddelta_k^T dt_low_k as one product per (route, image) summed afterwards: a
    # single product with a (C, R) output and a batch*L reduction runs far slower on GPUs.
    dt_low = xp[..., :rank].permute(2, 0, 1, 3).to(ddelta.dtype)  # (K, B, L, R)
    d_dt_weight = torch.matmul(ddelta.transpose(2, 3), dt_low).sum(1)
    dxp = torch.cat((d_dt_low.transpose(0, 1).reshape(batch, height * width, routes, rank),
                     dbc.to(x.dtype)), dim=-1).view(rows, -1)
    w = x_proj_w.reshape(dxp.shape[1], channels)
    dx = torch.addmm(du.sum(0).view(rows, channels), dxp, w)
    dw = (dxp.t() @ u.reshape(rows, channels)).view(x_proj_weight.shape)
    return [dx.view(x.shape), dw.to(x_proj_weight.dtype), d_dt_weight.to(dt_projs_weight.dtype),
            dA.to(A.dtype), dD.to(D.dtype) if D is not None else dA.new_empty(0), dbias.to(delta_bias.dtype)]


_core_bwd = torch.library.custom_op("vmamba::ss2d_core_bwd", _core_bwd_impl, mutates_args=())


@_core_bwd.register_fake
def _(grad_y, x, x_proj_weight, dt_projs_weight, A, D, delta_bias, states, nseq):
    return [torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x_proj_weight),
            torch.empty_like(dt_projs_weight), torch.empty_like(A),
            torch.empty_like(D) if D is not None else A.new_empty(0), torch.empty_like(delta_bias)]


def _setup_context(ctx, inputs, output):
    x, x_proj_weight, dt_projs_weight, A, D, delta_bias, nseq, _ = inputs
    ctx.save_for_backward(x, x_proj_weight, dt_projs_weight, A, D, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.nseq = nseq


def _backward_with(core_bwd):
    def backward(ctx, grad_y, _grad_states):
        x, x_proj_weight, dt_projs_weight, A, D, delta_bias, states = ctx.saved_tensors
        dx, dw, ddt, dA, dD, dbias = core_bwd(grad_y, x, x_proj_weight, dt_projs_weight, A, D, delta_bias, states,
                                              ctx.nseq)
        return dx, dw, ddt, dA, dD if D is not None else None, dbias, None, None

    return backward


_core_fwd.register_autograd(_backward_with(_core_bwd), setup_context=_setup_context)
_CoreEager = eager_function(_core_fwd_impl, _setup_context, _backward_with(_core_bwd_impl))


def ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, A: Tensor, D: Tensor | None,
              delta_bias: Tensor, mode: ScanMode | str = ScanMode.CROSS2D) -> Tensor:
    """All K route scans of an activated map x (B, H, W, C), returned in pixel order: (K, B, H, W, C).

    x_proj_weight (K, R + 2N, C), dt_projs_weight (K, C, R), A (K*C, N) (negative, float32), D and
    delta_bias (K*C,). Δ uses softplus(dt_proj·x_proj(x)[:R] + delta_bias). The output has x's dtype;
    state and accumulation are float32. Needs Triton; the tensors may live on CUDA (or the CPU under
    ``TRITON_INTERPRET=1``). Differentiable in every input.
    """
    mode = ScanMode(mode)
    if mode not in FUSED_MODES:
        raise ValueError(f"the fused SS2D core supports {[m.value for m in FUSED_MODES]}, got {mode.value!r}")
    routes = mode.num_routes
    if x.dim() != 4:
        raise ValueError(f"ss2d_core: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if x_proj_weight.shape[0] != routes or dt_projs_weight.shape[:2] != (routes, channels):
        raise ValueError(f"ss2d_core({mode.value}): expected {routes} routes of {channels} channels, got "
                         f"x_proj_weight {tuple(x_proj_weight.shape)}, dt_projs_weight {tuple(dt_projs_weight.shape)}")
    inputs = (x.contiguous(), x_proj_weight, dt_projs_weight, A.contiguous(),
              D.contiguous() if D is not None else None, delta_bias.contiguous())
    # When a backward will follow, the forward saves its chunk states on long routes, sparing the
    # backward a pass (on short ones recomputing cost no more, and the states cost memory).
    save_states = (x.shape[1] * x.shape[2] >= SAVE_STATES_MIN_LENGTH and torch.is_grad_enabled()
                   and any(t is not None and t.requires_grad for t in inputs))
    op = _core_fwd if compiling() else _CoreEager.call
    return op(*inputs, FUSED_MODES[mode], save_states)[0]

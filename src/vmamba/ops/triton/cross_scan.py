"""2D cross scan / cross merge as Triton kernels, with autograd (each is the other's adjoint).

Same contract as :mod:`vmamba.ops.cross_scan`: ``cross_scan_triton(x, mode, channel_last)`` maps a
(B, C, H, W) map (or (B, H, W, C)) to (B, K, C, H*W) route sequences; ``cross_merge_triton(y, H, W,
mode, channel_last)`` folds them back and sums. Routes: k0 row-major, k1 column-major, k2 / k3 the
reverses of k0 / k1 (cross2d); k0, reversed k0 (bidi); k0 (unidi).

One program handles a (BLOCK_C, BLOCK_H, BLOCK_W) tile of the map: it reads the tile once and writes
every route's copy of it (scan), or reads every route's values for it and writes the sum once
(merge, accumulated in float32). Inputs may have any strides; outputs are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["cross_scan_triton", "cross_merge_triton"]

_MODES = {"unidi": (0, 1), "bidi": (1, 2), "cross2d": (2, 4)}


@triton.jit
def _tile(pid_hw, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n_w = tl.cdiv(W, BLOCK_W)
    h = (pid_hw // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = (pid_hw % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    return h, w


@triton.jit
def _cross_kernel(
    x_ptr, y_ptr, Cn, H, W,
    sx_b, sx_c, sx_h, sx_w, sy_b, sy_k, sy_c, sy_l,
    MODE: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """x: the map (strides b, c, h, w); y: the routes (b, k, c, l). Scan: x → y; merge: y → x."""
    pid_hw = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h, w = _tile(pid_hw, H, W, BLOCK_H, BLOCK_W)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c3 = c[:, None, None]
    h3 = h[None, :, None]
    w3 = w[None, None, :]
    mask = (c3 < Cn) & (h3 < H) & (w3 < W)
    L = H * W
    x_ptrs = x_ptr + b * sx_b + c3 * sx_c + h3 * sx_h + w3 * sx_w
    y_base = y_ptr + b * sy_b + c3 * sy_c
    row = (h3 * W + w3).to(tl.int64)
    col = (w3 * H + h3).to(tl.int64)
    if MERGE:
        acc = tl.load(y_base + row * sy_l, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            acc += tl.load(y_base + sy_k + (L - 1 - row) * sy_l, mask=mask, other=0.0).to(tl.float32)
        if MODE == 2:
            acc += tl.load(y_base + sy_k + col * sy_l, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(y_base + 2 * sy_k + (L - 1 - row) * sy_l, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(y_base + 3 * sy_k + (L - 1 - col) * sy_l, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptrs, acc.to(x_ptr.dtype.element_ty), mask=mask)
    else:
        v = tl.load(x_ptrs, mask=mask, other=0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_base + row * sy_l, v, mask=mask)
        if MODE == 1:
            tl.store(y_base + sy_k + (L - 1 - row) * sy_l, v, mask=mask)
        if MODE == 2:
            tl.store(y_base + sy_k + col * sy_l, v, mask=mask)
            tl.store(y_base + 2 * sy_k + (L - 1 - row) * sy_l, v, mask=mask)
            tl.store(y_base + 3 * sy_k + (L - 1 - col) * sy_l, v, mask=mask)


def _mode(mode) -> tuple[int, int]:
    name = getattr(mode, "value", mode)
    if name not in _MODES:
        raise ValueError(f"triton cross scan supports modes {sorted(_MODES)}, got {name!r}")
    return _MODES[name]


# Overrides for benchmarking: {(channel_last, merge): (BLOCK_C, BLOCK_H, BLOCK_W, num_warps)}.
BLOCKS: dict = {}


def _blocks(channels: int, height: int, width: int, channel_last: bool, merge: bool) -> tuple[int, int, int, int]:
    """Tile sizes (picked from H200 sweeps): 32x32 pixel tiles (smaller maps: the map's size)."""
    if (channel_last, merge) in BLOCKS:
        bc, bh, bw, nw = BLOCKS[(channel_last, merge)]
    else:
        cap = 16 if channel_last and merge else 32
        bh = min(cap, triton.next_power_of_2(height))
        bw = min(cap, triton.next_power_of_2(width))
        elems = 16384 if channel_last else 4096
        bc = max(1, min(64, elems // (bh * bw)))
        nw = 8 if channel_last else 4
    return min(bc, triton.next_power_of_2(max(channels, 1))), bh, bw, nw


def _launch(x: Tensor, y: Tensor, mode_id: int, merge: bool, channel_last: bool) -> None:
    """x is the map viewed as (B, C, H, W) (any strides), y the routes (B, K, C, L)."""
    batch, channels, height, width = x.shape
    if x.numel() == 0:
        return
    bc, bh, bw, nw = _blocks(channels, height, width, channel_last, merge)
    grid = (triton.cdiv(height, bh) * triton.cdiv(width, bw), triton.cdiv(channels, bc), batch)
    _cross_kernel[grid](
        x, y, channels, height, width, *x.stride(), *y.stride(),
        MODE=mode_id, MERGE=merge, BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, num_warps=nw,
    )


def _scan_impl(x: Tensor, mode: str, channel_last: bool) -> Tensor:
    mode_id, k = _mode(mode)
    xv = x.permute(0, 3, 1, 2) if channel_last else x
    batch, channels, height, width = xv.shape
    y = torch.empty(batch, k, channels, height * width, device=x.device, dtype=x.dtype)
    _launch(xv, y, mode_id, False, channel_last)
    return y


def _merge_impl(y: Tensor, height: int, width: int, mode: str, channel_last: bool) -> Tensor:
    mode_id, _ = _mode(mode)
    batch, _, channels, _ = y.shape
    if channel_last:
        out = torch.empty(batch, height, width, channels, device=y.device, dtype=y.dtype)
        xv = out.permute(0, 3, 1, 2)
    else:
        out = xv = torch.empty(batch, channels, height, width, device=y.device, dtype=y.dtype)
    _launch(xv, y, mode_id, True, channel_last)
    return out


@torch.library.custom_op("vmamba::triton_cross_scan", mutates_args=())
def _cross_scan_op(x: Tensor, mode: str, channel_last: bool) -> Tensor:
    return _scan_impl(x, mode, channel_last)


@_cross_scan_op.register_fake
def _(x, mode, channel_last):
    _, k = _mode(mode)
    if channel_last:
        batch, height, width, channels = x.shape
    else:
        batch, channels, height, width = x.shape
    return x.new_empty(batch, k, channels, height * width)


@torch.library.custom_op("vmamba::triton_cross_merge", mutates_args=())
def _cross_merge_op(y: Tensor, height: int, width: int, mode: str, channel_last: bool) -> Tensor:
    return _merge_impl(y, height, width, mode, channel_last)


@_cross_merge_op.register_fake
def _(y, height, width, mode, channel_last):
    batch, _, channels, _ = y.shape
    shape = (batch, height, width, channels) if channel_last else (batch, channels, height, width)
    return y.new_empty(shape)


def _scan_setup(ctx, inputs, output):
    x, mode, channel_last = inputs
    ctx.mode, ctx.channel_last = mode, channel_last
    ctx.hw = (x.shape[1], x.shape[2]) if channel_last else (x.shape[2], x.shape[3])


def _scan_backward(ctx, grad):
    return _cross_merge_op(grad, ctx.hw[0], ctx.hw[1], ctx.mode, ctx.channel_last), None, None


def _merge_setup(ctx, inputs, output):
    _, _, _, mode, channel_last = inputs
    ctx.mode, ctx.channel_last = mode, channel_last


def _merge_backward(ctx, grad):
    return _cross_scan_op(grad, ctx.mode, ctx.channel_last), None, None, None, None


_cross_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)
_cross_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


def cross_scan_triton(x: Tensor, mode="cross2d", channel_last: bool = False) -> Tensor:
    """(B, C, H, W) or (B, H, W, C) map → (B, K, C, H*W) contiguous route sequences (differentiable)."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects a 4-D feature map, got shape {tuple(x.shape)}")
    mode = getattr(mode, "value", mode)
    _mode(mode)
    return _cross_scan_op(x, mode, bool(channel_last))


def cross_merge_triton(y: Tensor, height: int, width: int, mode="cross2d", channel_last: bool = False) -> Tensor:
    """Adjoint of :func:`cross_scan_triton`: (B, K, C, H*W) → summed map (B, C, H, W) or (B, H, W, C)."""
    mode = getattr(mode, "value", mode)
    _, k = _mode(mode)
    if y.dim() != 4 or y.shape[1] != k or y.shape[3] != height * width:
        raise ValueError(f"cross_merge({mode}) expects (B, {k}, C, {height * width}), got {tuple(y.shape)}")
    return _cross_merge_op(y, int(height), int(width), mode, bool(channel_last))

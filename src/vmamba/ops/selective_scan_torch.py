"""Selective scan from PyTorch tensor operations only: a chunked parallel (Hillis-Steele) linear scan.

The recurrence h_t = a_t h_{t-1} + b_t is solved inside fixed-size chunks with log2(chunk) doubling
steps, then across chunks by the same scan applied recursively to the chunk end-states. Only products
of decays in (0, 1] and sums of bounded terms appear, so nothing overflows however long L is.

The backward pass is written by hand: the adjoint of a linear recurrence is the same recurrence run
backwards, so the gradients cost two more scans instead of storing every doubling step for autograd.
Channels are processed in blocks to bound the (batch, channels, N, L) intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan_ref import compute_dtype, expand_groups, prepare_delta

CHUNK = 8
# Largest number of (batch x channel x state x position) elements materialised at once per block.
BLOCK_ELEMENTS = 1 << 23


def _doubling_scan_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In-place scan along dim 0: a becomes the running product of decays, b the states (zero start).

    Dim 0 is the short position-within-chunk axis, so every step works on large contiguous blocks.
    """
    length = a.shape[0]
    step = 1
    while step < length:
        b[step:] += a[step:] * b[:-step]  # the right side is evaluated before b is written
        a[step:] = a[step:] * a[:-step]
        step *= 2


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """States of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along the last dimension.

    Positions are grouped into chunks; each chunk is scanned in log2(chunk) doubling steps, the chunk
    end-states are scanned recursively, and the carries are folded back in with one multiply-add.
    """
    length = a.shape[-1]
    lead = a.shape[:-1]
    pad = (-length) % chunk
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    n_chunks = a.shape[-1] // chunk
    # (chunk, rows, n_chunks) copies that the in-place doubling steps may overwrite.
    decay = a.reshape(-1, n_chunks, chunk).permute(2, 0, 1).clone(memory_format=torch.contiguous_format)
    local = b.reshape(-1, n_chunks, chunk).permute(2, 0, 1).clone(memory_format=torch.contiguous_format)
    _doubling_scan_(decay, local)
    if n_chunks > 1:
        ends = linear_scan(decay[-1], local[-1], chunk)
        local = torch.addcmul(local, decay, F.pad(ends[:, :-1], (1, 0)))
    return local.permute(1, 2, 0).reshape(*lead, n_chunks * chunk)[..., :length]


def _channels_per_block(batch: int, channels: int, state: int, length: int) -> int:
    """How many channels to process at once so a block holds about BLOCK_ELEMENTS elements."""
    return min(channels, max(1, BLOCK_ELEMENTS // max(1, batch * state * length)))


def _group_slices(channels: int, groups: int, start: int, stop: int):
    """Yield (group index, channel slice within [start, stop)) pieces of a channel range."""
    per_group = channels // groups
    pos = start
    while pos < stop:
        group = pos // per_group
        end = min(stop, (group + 1) * per_group)
        yield group, slice(pos, end)
        pos = end


def _block_inputs(B, C, group_pieces, dtype):
    """Per-block (b, c, N, L) copies of B and C matching the channel pieces of the block."""
    Bs = torch.cat([B[:, g, None].expand(-1, sl.stop - sl.start, -1, -1) for g, sl in group_pieces], 1)
    Cs = torch.cat([C[:, g, None].expand(-1, sl.stop - sl.start, -1, -1) for g, sl in group_pieces], 1)
    return Bs.to(dtype), Cs.to(dtype)


def selective_scan_torch_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Forward selective scan (no autograd). Same contract as the reference."""
    dtype = compute_dtype(u, delta, A, B, C)
    batch, channels, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    dt = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    u_c = u.to(dtype)
    y = torch.empty(batch, channels, length, dtype=dtype, device=u.device)
    step = _channels_per_block(batch, channels, state, length)
    for start in range(0, channels, step):
        stop = min(channels, start + step)
        pieces = list(_group_slices(channels, groups, start, stop))
        Bs, Cs = _block_inputs(B, C, pieces, dtype)
        dt_b = dt[:, start:stop, None, :]
        a = torch.exp(dt_b * A[start:stop, :, None].to(dtype))
        x = (dt_b * u_c[:, start:stop, None, :]) * Bs
        h = linear_scan(a, x)
        y[:, start:stop] = (h * Cs).sum(2)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c
    return y


def selective_scan_torch_bwd(grad_out, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of sum(grad_out * y); dD/ddelta_bias None if absent."""
    dtype = compute_dtype(u, delta, A, B, C)
    batch, channels, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    dt = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    u_c = u.to(dtype)
    gy = grad_out.to(dtype)
    A_c = A.to(dtype)
    d_u = torch.empty_like(u_c)
    d_dt = torch.empty_like(u_c)
    d_A = torch.empty_like(A_c)
    d_B = torch.zeros(B.shape, dtype=dtype, device=u.device)
    d_C = torch.zeros(C.shape, dtype=dtype, device=u.device)
    step = _channels_per_block(batch, channels, state, length)
    for start in range(0, channels, step):
        stop = min(channels, start + step)
        pieces = list(_group_slices(channels, groups, start, stop))
        Bs, Cs = _block_inputs(B, C, pieces, dtype)
        dt_b = dt[:, start:stop, None, :]
        u_b = u_c[:, start:stop, None, :]
        a = torch.exp(dt_b * A_c[start:stop, :, None])
        h = linear_scan(a, (dt_b * u_b) * Bs)
        # Adjoint recurrence g_t = C_t gy_t + a_{t+1} g_{t+1}, solved as a forward scan on flipped time.
        a_next = F.pad(a[..., 1:], (0, 1))
        g = linear_scan(a_next.flip(-1), (Cs * gy[:, start:stop, None, :]).flip(-1)).flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0))
        g_log_decay = g * h_prev * a  # gradient with respect to dt * A
        d_A[start:stop] = (g_log_decay * dt_b).sum(dim=(0, 3))
        g_B = g * Bs
        d_dt[:, start:stop] = (g_log_decay * A_c[start:stop, :, None]).sum(2) + (g_B * u_b).sum(2)
        d_u[:, start:stop] = (g_B * dt_b).sum(2)
        gdu = g * (dt_b * u_b)
        ghC = h * gy[:, start:stop, None, :]
        offset = 0
        for group, sl in pieces:
            width = sl.stop - sl.start
            d_B[:, group] += gdu[:, offset:offset + width].sum(1)
            d_C[:, group] += ghC[:, offset:offset + width].sum(1)
            offset += width
    d_D = None
    if D is not None:
        d_u = d_u + D.to(dtype)[:, None] * gy
        d_D = (gy * u_c).sum(dim=(0, 2))
    d_delta = d_dt
    if delta_softplus:
        raw = delta.to(dtype)
        if delta_bias is not None:
            raw = raw + delta_bias.to(dtype)[:, None]
        d_delta = d_dt * torch.sigmoid(raw)
    d_bias = d_delta.sum(dim=(0, 2)) if delta_bias is not None else None
    return d_u, d_delta, d_A, d_B, d_C, d_D, d_bias


def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Autograd-enabled torch selective scan (used directly, outside the custom op)."""
    return _TorchScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)


class _TorchScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return selective_scan_torch_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        grads = selective_scan_torch_bwd(grad_out, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus)
        inputs = (u, delta, A, B, C, D, delta_bias)
        return (*(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)), None)


__all__ = ["linear_scan", "selective_scan_torch", "selective_scan_torch_fwd", "selective_scan_torch_bwd",
           "expand_groups"]

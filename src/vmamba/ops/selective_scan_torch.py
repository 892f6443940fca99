"""Selective scan from PyTorch tensor operations only: a chunked linear scan.

The recurrence h_t = a_t h_{t-1} + b_t is split into chunks of CHUNK positions. All chunks advance
together, one position per step (CHUNK vectorised steps, whatever L is), and the chunk end-states are
combined by the same scan applied recursively to them, so a sequence of any length costs
O(CHUNK · log_CHUNK L) tensor operations. Only products of decays in (0, 1] and sums of bounded terms
appear, so nothing overflows however long L is.

Everything runs in a "chunk layout" (T, batch, K, C, N, n_chunks): the short position-within-chunk
axis first, so each step is one large contiguous elementwise operation, and the group
structure (B and C shared by the C channels of a group) is plain broadcasting.

The backward pass is written by hand: the adjoint of a linear recurrence is the same recurrence run
backwards in time, so the gradients cost two more scans instead of storing every step for autograd.
Batch items are processed in blocks to bound the (batch, channels, N, L) intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan_ref import compute_dtype

CHUNK = 8
# Largest number of (batch x channel x state x position) elements materialised at once per block.
BLOCK_ELEMENTS = 1 << 23


# -- generic scan along the last dimension (used for chunk carries and by other modules) -------------
def linear_scan(a: Tensor, b: Tensor, chunk: int = CHUNK, reverse: bool = False) -> Tensor:
    """States of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along the last dimension.

    With ``reverse`` the recurrence runs from the end: h_t = a_t * h_{t+1} + b_t.
    """
    length = a.shape[-1]
    lead = a.shape[:-1]
    states = _chunk_scan(_to_chunks(a, chunk, 1.0, reverse), _to_chunks(b, chunk, 0.0, reverse), chunk, reverse)
    return _from_chunks(states, lead, length, reverse)


def _to_chunks(x: Tensor, chunk: int, pad_value: float, reverse: bool = False, add: Tensor | None = None) -> Tensor:
    """(..., L) → contiguous (T, ..., n_chunks), padded at the end (the start when ``reverse``).

    ``add`` (broadcastable to the chunk layout) is added in the same pass as the layout change.
    """
    length = x.shape[-1]
    pad = (-length) % chunk
    if pad:
        x = F.pad(x, (pad, 0) if reverse else (0, pad), value=pad_value)
    n_chunks = x.shape[-1] // chunk
    x = x.reshape(*x.shape[:-1], n_chunks, chunk)
    dims = x.dim()
    source = x.permute(dims - 1, *range(dims - 2), dims - 2)
    out = torch.empty(source.shape, dtype=x.dtype, device=x.device)
    return torch.add(source, add, out=out) if add is not None else out.copy_(source)


def _from_chunks(x: Tensor, lead: tuple[int, ...], length: int, reverse: bool = False) -> Tensor:
    """Inverse of :func:`_to_chunks` for a (T, ..., n_chunks) tensor whose middle dims equal ``lead``."""
    dims = x.dim()
    x = x.permute(*range(1, dims - 1), dims - 1, 0).reshape(*lead, -1)
    return x[..., x.shape[-1] - length:] if reverse else x[..., :length]


def _chunk_scan(decay: Tensor, local: Tensor, chunk: int, reverse: bool = False) -> Tensor:
    """States of the recurrence for contiguous (T, ..., n_chunks) inputs; overwrites both inputs.

    Each of the T steps advances the recurrence by one position in every chunk at once (one fused
    multiply-add over a contiguous slab), so the number of Python-level operations depends on the chunk
    size only, never on L. ``decay`` becomes the running product of decays within each chunk, which
    carries the chunk-start states in.
    """
    length = decay.shape[0]
    steps = range(length - 2, -1, -1) if reverse else range(1, length)
    for t in steps:
        prev = t + 1 if reverse else t - 1
        local[t].addcmul_(decay[t], local[prev])
        decay[t].mul_(decay[prev])
    n_chunks = local.shape[-1]
    if n_chunks == 1:
        return local
    if reverse:
        ends = linear_scan(decay[0], local[0], chunk, reverse=True)
        carry = F.pad(ends[..., 1:], (0, 1))
    else:
        ends = linear_scan(decay[-1], local[-1], chunk)
        carry = F.pad(ends[..., :-1], (1, 0))
    return local.addcmul_(decay, carry)


def _shift_prev(x: Tensor) -> Tensor:
    """Chunk-layout tensor of the previous position's values (zero before the first position)."""
    out = torch.empty_like(x)
    out[1:] = x[:-1]
    out[0, ..., 1:] = x[-1, ..., :-1]
    out[0, ..., 0] = 0
    return out


def _shift_next(x: Tensor) -> Tensor:
    """Chunk-layout tensor of the next position's values (zero after the last position)."""
    out = torch.empty_like(x)
    out[:-1] = x[1:]
    out[-1, ..., :-1] = x[0, ..., 1:]
    out[-1, ..., -1] = 0
    return out


# -- selective scan ------------------------------------------------------------------------------------
class _Layout:
    """Chunk-layout views of the scan inputs for batch items [start, stop)."""

    def __init__(self, u, delta, A, B, C, D, delta_bias, delta_softplus, dtype, start, stop):
        batch, channels, length = u.shape
        groups, state = B.shape[1], A.shape[1]
        per_group = channels // groups
        self.length, self.groups, self.per_group = length, groups, per_group
        rows = slice(start, stop)
        # (b, K, C, 1, L) / (b, K, 1, N, L) → chunk layout (T, b, K, C|1, 1|N, n_chunks)
        self.u = _to_chunks(u[rows].to(dtype).view(-1, groups, per_group, 1, length), CHUNK, 0.0)
        bias = None if delta_bias is None else delta_bias.to(dtype).view(groups, per_group, 1, 1)
        self.raw = _to_chunks(delta[rows].to(dtype).view(-1, groups, per_group, 1, length), CHUNK, 0.0, add=bias)
        self.dt = F.softplus(self.raw) if delta_softplus else self.raw
        self.B = _to_chunks(B[rows].to(dtype)[:, :, None], CHUNK, 0.0)
        self.C = _to_chunks(C[rows].to(dtype)[:, :, None], CHUNK, 0.0)
        self.A = A.to(dtype).view(groups, per_group, state)[None, :, :, :, None]  # (1, K, C, N, 1)
        self.D = None if D is None else D.to(dtype).view(groups, per_group, 1, 1)

    def decay(self) -> Tensor:
        """a_t = exp(Δ_t A), (T, b, K, C, N, n_chunks)."""
        return torch.exp(self.dt * self.A)

    def states(self, decay: Tensor) -> Tensor:
        """h_t, (T, b, K, C, N, n_chunks); overwrites ``decay``."""
        return _chunk_scan(decay, (self.dt * self.u) * self.B, CHUNK)

    def chunk_view(self, out: Tensor) -> Tensor | None:
        """``out`` (b, K*C, L) seen in chunk layout (T, b, K, C, 1, n_chunks), or None if L needs padding."""
        if self.length % CHUNK:
            return None
        batch = out.shape[0]
        return out.view(batch, self.groups, self.per_group, -1, CHUNK).permute(4, 0, 1, 2, 3).unsqueeze(4)

    def write_sequence(self, x: Tensor, out: Tensor) -> None:
        """Copy a (T, b, K, C, 1, n_chunks) chunk-layout tensor into ``out`` (b, K*C, L)."""
        batch, length = out.shape[0], self.length
        source = x.squeeze(4).permute(1, 2, 3, 4, 0)  # (b, K, C, n_chunks, T)
        target = out.view(batch, self.groups, self.per_group, length)
        if length % CHUNK == 0:
            target.view(batch, self.groups, self.per_group, -1, CHUNK).copy_(source)
        else:
            target.copy_(source.reshape(batch, self.groups, self.per_group, -1)[..., :length])


def _write(value: Tensor | tuple[Tensor, Tensor], lay: _Layout, out: Tensor) -> None:
    """Store a chunk-layout tensor, or the product of a pair of them, into ``out`` (b, K*C, L).

    A product is computed straight into the output's own layout when L needs no padding.
    """
    target = lay.chunk_view(out)
    if isinstance(value, tuple):
        if target is not None:
            torch.mul(*value, out=target)
            return
        value = value[0] * value[1]
    if target is not None:
        target.copy_(value)
    else:
        lay.write_sequence(value, out)


def _sum_states(x: Tensor) -> Tensor:
    """Sum over the state dimension (dim 4), keeping it; free when N = 1."""
    return x if x.shape[4] == 1 else x.sum(4, keepdim=True)


def _batch_block(batch: int, channels: int, state: int, length: int) -> int:
    return min(batch, max(1, BLOCK_ELEMENTS // max(1, channels * state * length)))


def selective_scan_torch_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Forward selective scan (no autograd). Same contract as the reference."""
    dtype = compute_dtype(u, delta, A, B, C)
    batch, channels, length = u.shape
    y = torch.empty(batch, channels, length, dtype=dtype, device=u.device)
    step = _batch_block(batch, channels, A.shape[1], length)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        lay = _Layout(u, delta, A, B, C, D, delta_bias, delta_softplus, dtype, start, stop)
        h = lay.states(lay.decay())
        out = y[start:stop]
        target = lay.chunk_view(out)
        if target is None:
            lay.write_sequence(_sum_states(h * lay.C), out)
        elif h.shape[4] == 1:
            torch.mul(h, lay.C, out=target)  # written straight into the output's own layout
        else:
            torch.sum(h * lay.C, dim=4, keepdim=True, out=target)
        if D is not None:
            out.addcmul_(u[start:stop].to(dtype), D.to(dtype)[:, None])
    return y


def selective_scan_torch_bwd(grad_out, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of sum(grad_out * y); dD/ddelta_bias None if absent."""
    dtype = compute_dtype(u, delta, A, B, C)
    batch, channels, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    d_u = torch.empty(batch, channels, length, dtype=dtype, device=u.device)
    d_delta = torch.empty_like(d_u)
    d_A = torch.zeros(channels, state, dtype=dtype, device=u.device)
    d_B = torch.empty(B.shape, dtype=dtype, device=u.device)
    d_C = torch.empty(C.shape, dtype=dtype, device=u.device)
    d_D = torch.zeros(channels, dtype=dtype, device=u.device) if D is not None else None
    step = _batch_block(batch, channels, state, length)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        lay = _Layout(u, delta, A, B, C, D, delta_bias, delta_softplus, dtype, start, stop)
        gy = _to_chunks(grad_out[start:stop].to(dtype).view(-1, groups, channels // groups, 1, length), CHUNK, 0.0)
        a = lay.decay()
        a_next = _shift_next(a)
        dt_u = lay.dt * lay.u
        h = _chunk_scan(a.clone(), dt_u * lay.B, CHUNK)
        # Adjoint recurrence g_t = C_t gy_t + a_{t+1} g_{t+1}: a reverse-time scan.
        g = _chunk_scan(a_next, lay.C * gy, CHUNK, reverse=True)
        grad_log_decay = g * _shift_prev(h) * a  # gradient with respect to dt * A
        g_B = g * lay.B
        d_A += (grad_log_decay * lay.dt).sum(dim=(0, 1, 5)).reshape(channels, state)
        d_dt = _sum_states(torch.addcmul(grad_log_decay * lay.A, g_B, lay.u))
        d_B[start:stop] = _from_chunks((g * dt_u).sum(3), (stop - start, groups, state), length)
        d_C[start:stop] = _from_chunks((h * gy).sum(3), (stop - start, groups, state), length)
        if lay.D is not None:
            d_D += (gy * lay.u).sum(dim=(0, 1, 4, 5)).reshape(channels)
        _write(_sum_states(g_B * lay.dt) if state > 1 else (g_B, lay.dt), lay, d_u[start:stop])
        if lay.D is not None:
            d_u[start:stop].addcmul_(grad_out[start:stop].to(dtype), D.to(dtype)[:, None])
        _write((d_dt, torch.sigmoid(lay.raw)) if delta_softplus else d_dt, lay, d_delta[start:stop])
    d_bias = d_delta.sum(dim=(0, 2)) if delta_bias is not None else None
    return d_u, d_delta, d_A, d_B, d_C, d_D, d_bias


__all__ = ["linear_scan", "selective_scan_torch_bwd", "selective_scan_torch_fwd"]

"""Selective scan forward at d_state 1 over packed rows: R whole rows a program, as one flat run.

A block of R consecutive channels of one batch element is R·L consecutive elements in memory when
rows are contiguous. A program loads that run as a (BLOCK / V, V) tile: each thread holds V consecutive
elements, one aligned 16-byte vector whatever L is, and the scan runs sequentially over them in
registers before its warp- and block-level steps. Where the block does not start on a vector boundary
the tile starts at the boundary before it: the up to V - 1 elements of the previous row's tail are
loaded and scanned again, but not stored. Stores stay whole vectors: a vector that two blocks share
is stored by the earlier one, whose scan also covers the later block's first elements exactly (the
recurrence restarts at their row). It restarts at every row through a zero decay at the row's first
position (h_t = 0·h_{t-1} + x_t). With V <= L a thread's elements span at most two rows, so what
depends on the row (A, bias, D, the group's B and C) is loaded per thread for both and selected per
element; with ALIGN_BC, where L and B's and C's rows are aligned, B and C load as aligned vector pieces
instead (:func:`_group_row_at`).

Short rows otherwise waste lanes or vector width: L = 49 (VMamba-T stage 4) rows are 98 bytes in
bf16, aligned to 2 bytes, so tiles of whole rows load them one element at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selective_scan import (
    _aligned,
    _combine,
    _exp2,
    _next_pow2,
    _softplus_and_slope,
    cdiv,
    common_alignment,
    fast_math,
)

__all__ = ["packed_fwd", "packed_fwd_applies", "rows_per_tile"]


@triton.jit
def _row_pair(ptr, stride, d, KC, nxt, scale: tl.constexpr = 1.0):
    """Per element, a per-channel float32 parameter of its row (times ``scale``): the thread's first row
    d, or the next."""
    lo = tl.load(ptr + d * stride, mask=d < KC, other=0.0).to(tl.float32)
    hi = tl.load(ptr + (d + 1) * stride, mask=d + 1 < KC, other=0.0).to(tl.float32)
    if scale != 1.0:  # once per thread and row, not per element
        lo *= scale
        hi *= scale
    return tl.where(nxt, hi, lo)


@triton.jit
def _group_row_at(base, sk, sl, k, k_next, t0, j, nxt, L: tl.constexpr, ALIGN: tl.constexpr):
    """Per element, the address of its B (or C) value in the batch element at ``base``: position t0 + j
    of the first row's group k, or position t0 + j - L of the next row's group.

    ALIGN > 1 (L and the group stride are multiples of it, as the launch checked): an element past the
    row boundary steps back by an integer offset, not a select between two pointers, so the compiler
    sees the thread's run as aligned contiguous pieces and loads vectors. Else the select, which is
    fewer instructions where rows are not aligned (L = 49)."""
    if ALIGN > 1:
        sk = _aligned(sk, ALIGN)
        # one integer offset, then one pointer add (fewer instructions than adding the terms one by one)
        return base + (k * sk + (t0 + j) * sl - nxt.to(tl.int32) * (L * sl + (k - k_next) * sk))
    return tl.where(nxt, base + k_next * sk + (t0 - L) * sl, base + k * sk + t0 * sl) + j * sl


@triton.jit
def _packed_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, KC,
                       su_b, sdt_b, sy_b, sA_d, sB_b, sB_k, sB_l, sC_b, sC_k, sC_l, sD, sbias,
                       L: tl.constexpr, CG: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, V: tl.constexpr,
                       BC_ALIGN: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """y of rows q·R ... q·R + R - 1 of one batch element (grid: row blocks, batch), as a (BLOCK / V, V)
    tile (see the module docstring): each thread holds V consecutive elements (V <= L), which span at
    most two rows, so what depends on the row (A, bias, D, the group's B and C) is found per thread for
    both and selected per element."""
    q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    first = q * (R * L)  # the block's first element within the batch element
    # the tile covers the block's elements in whole vectors: where they do not start and end on vector
    # boundaries, also the tails of the rows around it (read and scanned, not stored)
    if R * L % V == 0:
        start = first
        stop = first + R * L
    else:
        start = first // V * V
        stop = (first + R * L + V - 1) // V * V
    e0 = start + tl.arange(0, BLOCK // V)[:, None] * V
    j = tl.arange(0, V)[None, :]
    d = e0 // L  # the thread's first row (channel)
    t0 = e0 - d * L
    nxt = j >= L - t0  # in the row after the thread's first
    offs = e0 + j
    inside = (offs < stop) & (offs < KC * L)  # whole vectors
    u = tl.load(u_ptr + b * su_b + offs, mask=inside, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + b * sdt_b + offs, mask=inside, other=0.0).to(tl.float32)
    owned = inside
    if R * L % V != 0:
        # a program stores whole vectors: not the first where the block starts inside one (the previous
        # program stores that one), but all of its last, whose elements past the block begin the next row
        # and so come out exact here too (the recurrence restarts there)
        owned = inside & (e0 >= (first + V - 1) // V * V)
    if HAS_BIAS:
        raw += _row_pair(bias_ptr, sbias, d, KC, nxt)
    dt = raw
    if SOFTPLUS:
        dt, _ = _softplus_and_slope(raw, FAST)
    # the rows' B and C from the thread's first position on: position t0 of the first row's group, and
    # position t0 - L of the next row's
    # rows past the last channel (the last program's tail slots) read the last group's B and C: every
    # address is valid, so B and C load unmasked (no zero fill); those slots are never stored, and u is
    # zero there
    k = tl.minimum(d, KC - 1) // CG
    k_next = tl.minimum(d + 1, KC - 1) // CG
    if BC_ALIGN > 1:  # the batch strides too (the launch checked)
        sB_b, sC_b = _aligned(sB_b, BC_ALIGN), _aligned(sC_b, BC_ALIGN)
    B_at = _group_row_at(B_ptr + b * sB_b, sB_k, sB_l, k, k_next, t0, j, nxt, L, BC_ALIGN)
    C_at = _group_row_at(C_ptr + b * sC_b, sC_k, sC_l, k, k_next, t0, j, nxt, L, BC_ALIGN)
    Bt = tl.load(B_at).to(tl.float32)
    Ct = tl.load(C_at).to(tl.float32)
    starts = (j == 0) & (t0 == 0) | (j == L - t0)  # a row's first position
    a = tl.where(starts, 0.0, _exp2(dt * _row_pair(A_ptr, sA_d, d, KC, nxt, 1.4426950408889634), FAST))
    x = dt * u * Bt  # zero outside the rows: u loads as zeros there
    _, h = tl.associative_scan((tl.reshape(a, (BLOCK,)), tl.reshape(x, (BLOCK,))), 0, _combine)
    y = tl.reshape(h, (BLOCK // V, V)) * Ct
    if HAS_D:
        y += u * _row_pair(D_ptr, sD, d, KC, nxt)
    tl.store(y_ptr + b * sy_b + offs, y, mask=owned)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy of it, whose rows (channels) lie end to end within each batch element."""
    length = x.shape[2]
    if x.stride(2) == 1 and (x.stride(1) == length or x.shape[1] == 1):
        return x
    return x.contiguous()


def _bc_alignment(length: int, B: torch.Tensor, C: torch.Tensor) -> int:
    """The largest power of two up to 16 that divides L and the batch and group strides of B and C
    (elements), for :func:`_aligned`; 1 where B or C is not contiguous along L."""
    if B.stride(3) != 1 or C.stride(3) != 1:
        return 1
    return common_alignment((length, B.stride(0), B.stride(1), C.stride(0), C.stride(1)))


def _tile_span(length: int, rows: int, vector: int) -> int:
    """Elements a tile must hold: the block's rows, and where blocks do not start on vector boundaries
    the up to vector - 1 elements before them."""
    return rows * length + (0 if rows * length % vector == 0 else vector - 1)


def _block(length: int, rows: int, vector: int) -> int:
    """Tile elements (a power of two)."""
    return _next_pow2(_tile_span(length, rows, vector))


def rows_per_tile(length: int, vector: int, tile: int) -> int:
    """The most whole rows a tile of ``tile`` elements holds (0 if not one)."""
    rows = tile // length
    while rows and _tile_span(length, rows, vector) > tile:
        rows -= 1
    return rows


def packed_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, rows: int, vector: int,
               out: torch.Tensor | None = None, align_bc: bool = False) -> torch.Tensor:
    """Forward over packed rows, ``rows`` a program held as ``vector`` consecutive elements a thread
    (:func:`packed_fwd_applies`); y (batch, KC, L) float32, written to ``out`` (contiguous) if given.
    Rows of u and delta are made contiguous where they are not. ``align_bc``: declare the alignment of
    L and of B's and C's rows (:func:`_bc_alignment`) and read B and C in aligned pieces."""
    u, delta = _rows_contiguous(u), _rows_contiguous(delta)
    batch, channels, length = u.shape
    cg = channels // B.shape[1]
    y = torch.empty(batch, channels, length, device=u.device, dtype=torch.float32) if out is None else out
    Dt = D if D is not None else y
    bt = delta_bias if delta_bias is not None else y
    block = _block(length, rows, vector)
    _packed_fwd_kernel[(cdiv(channels, rows), batch)](
        u, delta, A, B, C, Dt, bt, y, channels, u.stride(0), delta.stride(0), y.stride(0), A.stride(0),
        B.stride(0), B.stride(1), B.stride(3), C.stride(0), C.stride(1), C.stride(3), Dt.stride(0), bt.stride(0),
        L=length, CG=cg, R=rows, BLOCK=block, V=vector, BC_ALIGN=_bc_alignment(length, B, C) if align_bc else 1,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), FAST=fast_math(u), num_warps=max(1, min(16, block // vector // 32)),
    )
    return y


def packed_fwd_applies(state: int, length: int, rows: int, vector: int) -> bool:
    """Whether the packed forward applies: one state; ``vector`` a power of two at most L."""
    return state == 1 and rows > 0 and 0 < vector <= length and vector & (vector - 1) == 0

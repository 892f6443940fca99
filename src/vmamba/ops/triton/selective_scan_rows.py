"""Selective scan backward at d_state 1 over whole short rows, consecutive steps in each lane.

A program holds BLOCK_D rows (channels) of one group of one batch element as (LANES_T, BLOCK_D, STEPS)
tiles: lane i of a row holds its positions i·STEPS ... i·STEPS + STEPS - 1 in registers, so
LANES_T·STEPS >= L. Time is then in registers within a lane and across lanes between lanes, and both
scans of the backward run in two levels:

* within a lane, ``associative_scan`` along the in-thread axis: a sequential loop, no shuffles;
* across lanes, one element a lane: the lane totals are composed with :func:`_adjoint_combine`, whose
  second pair reads out the composition of everything before (forward) or after (adjoint) a lane but
  not the lane itself, which is the state (or adjoint carry) entering it.

"Lanes" are positions of the tile's first axis: with more of them than the program's threads have
for BLOCK_D channels (64 lanes of 4 steps at L 196 on one warp), a thread holds several, 32 apart, and
Triton's scan over that axis handles the repetition.

The whole-row kernel of :mod:`.selective_scan` (time across the lanes, one position a lane per
register) instead runs every scan over the lanes for each register of a lane, and Triton compiles the
adjoint's reverse scan there to butterfly shuffles that flip the lanes (175 of the L-196 loop's 1192
instructions, sm_90a); in-thread reverse scans and ``tl.flip`` compile to shuffles too, so the steps
are reversed here by re-joining them (:func:`_reversed_steps`). Triton gives a thread consecutive
elements only where a load is vectorized: where L and the row strides are multiples of STEPS
(L 196 with 4 steps) each lane's steps load and store as one vector; rows not aligned to it (L 49) are
loaded a step at a time and joined (``tl.join``) into the in-thread axis.

Each program walks ROW_BLOCKS blocks of BLOCK_D channels in turn and keeps dB / dC summed over them
in registers, so one partial per program goes to the workspace. No states are kept: a row starts from
a zero state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials
from .selective_scan import (
    _adjoint_combine,
    _aligned,
    _aligned_inputs,
    _combine,
    _exp2,
    _softplus_and_slope,
    cdiv,
    common_alignment,
    fast_math,
)

__all__ = ["rows_bwd", "rows_bwd_applies"]


@triton.jit
def _halves(x, N: tl.constexpr):
    """(even steps, odd steps) of a tile of N steps, each a tile of N // 2 (no data moves)."""
    if N > 2:
        x = tl.reshape(x, (x.shape[0], x.shape[1], N // 2, 2))
    return tl.split(x)


@triton.jit
def _interleaved(even, odd, N: tl.constexpr):
    """The tile of N steps whose even steps are ``even`` and odd ones ``odd``: :func:`_halves` undone."""
    out = tl.join(even, odd)
    if N > 2:
        out = tl.reshape(out, (out.shape[0], out.shape[1], N))
    return out


@triton.jit
def _load_steps(ptrs, pos, ok, L, sl, N: tl.constexpr, FIRST: tl.constexpr, STRIDE: tl.constexpr,
                WHOLE: tl.constexpr):
    """(LANES_T, BLOCK_D, N) float32 tile of steps FIRST + STRIDE·m (m < N) of every lane, from the
    (LANES_T, BLOCK_D) pointers ``ptrs`` of the lanes' first positions ``pos``; zero outside ``ok`` and L.

    WHOLE (rows and strides aligned to N elements, declared): one vector load of the N steps. Else the
    steps are loaded one at a time and joined: even steps at index 0 of the new last axis, odd at 1, then
    that axis merged into the steps axis."""
    if WHOLE:
        steps = tl.arange(0, N)[None, None, :]
        out = tl.load(ptrs[:, :, None] + steps * sl, mask=ok[:, :, None] & (pos[:, :, None] + steps < L),
                      other=0.0).to(tl.float32)
    elif N == 1:
        out = tl.load(ptrs + FIRST * sl, mask=ok & (pos + FIRST < L), other=0.0).to(tl.float32)
    else:
        out = _interleaved(_load_steps(ptrs, pos, ok, L, sl, N // 2, FIRST, 2 * STRIDE, False),
                           _load_steps(ptrs, pos, ok, L, sl, N // 2, FIRST + STRIDE, 2 * STRIDE, False), N)
    return out


@triton.jit
def _store_steps(ptrs, pos, ok, L, sl, x, N: tl.constexpr, FIRST: tl.constexpr, STRIDE: tl.constexpr,
                 WHOLE: tl.constexpr):
    """Stores the steps of a tile of :func:`_load_steps`' layout, the inverse of its joins."""
    if WHOLE:
        steps = tl.arange(0, N)[None, None, :]
        tl.store(ptrs[:, :, None] + steps * sl, x, mask=ok[:, :, None] & (pos[:, :, None] + steps < L))
    elif N == 1:
        tl.store(ptrs + FIRST * sl, x, mask=ok & (pos + FIRST < L))
    else:
        lo, hi = _halves(x, N)
        _store_steps(ptrs, pos, ok, L, sl, lo, N // 2, FIRST, 2 * STRIDE, False)
        _store_steps(ptrs, pos, ok, L, sl, hi, N // 2, FIRST + STRIDE, 2 * STRIDE, False)


@triton.jit
def _edge_step(x, LAST: tl.constexpr, N: tl.constexpr):
    """The first (or LAST) step of every lane of a steps tile: a (LANES_T, BLOCK_D) tile."""
    lo, hi = _halves(x, N)
    if LAST:
        out = hi
    else:
        out = lo
    if N > 2:
        out = _edge_step(out, LAST, N // 2)
    return out


@triton.jit
def _reversed_steps(x, N: tl.constexpr):
    """A steps tile with each lane's steps in reverse order: the joins of :func:`_load_steps` undone and
    redone the other way round, so no data moves (``tl.flip`` and reverse scans compile to shuffles even
    along an axis held within the thread)."""
    lo, hi = _halves(x, N)
    if N > 2:
        lo = _reversed_steps(lo, N // 2)
        hi = _reversed_steps(hi, N // 2)
    return _interleaved(hi, lo, N)


@triton.jit
def _states(a, x):
    """States h of every step from a zero state: a scan within each lane, then the state entering each
    lane from the exclusive part of a scan over the lanes' totals."""
    a_in, x_in = tl.associative_scan((a, x), 2, _combine)
    lane_a = _edge_step(a_in, True, a.shape[2])
    lane_x = _edge_step(x_in, True, a.shape[2])
    one = tl.full(lane_a.shape, 1.0, tl.float32)
    _, _, _, entering = tl.associative_scan((lane_a, lane_x, one, tl.zeros_like(lane_a)), 0, _adjoint_combine)
    return a_in * entering[:, :, None] + x_in


@triton.jit
def _next_steps(x, fill, N: tl.constexpr):
    """x_{t+1} for every step of a steps tile, ``fill`` at each lane's last step: joins again, no data
    moves (the odd steps become the even ones, the even ones shifted by one the odd ones)."""
    lo, hi = _halves(x, N)
    if N > 2:
        after = _next_steps(lo, fill, N // 2)
    else:
        after = tl.full(lo.shape, fill, tl.float32)
    return _interleaved(hi, after, N)


@triton.jit
def _adjoints(a, c):
    """Adjoint states g_t = c_t + a_{t+1} g_{t+1} (zero past the row). Within each lane, the scan of the
    pairs (a_{t+1}, c_t) over the reversed steps gives g_t = g0_t + k_t w, in the carry w = a_{t+1} g_{t+1}
    entering the lane's last step from the lane after it (k_t: the decays from t + 1 to the lane's end).
    The carry comes from the exclusive part of a reverse scan over the lanes of what each passes on,
    a_{t0} g_{t0} = a_{t0} k_{t0} w + a_{t0} g0_{t0} at its first step t0."""
    n: tl.constexpr = a.shape[2]
    k_rev, g0_rev = tl.associative_scan((_reversed_steps(_next_steps(a, 1.0, n), n), _reversed_steps(c, n)), 2,
                                        _combine)
    first_a = _edge_step(a, False, n)
    lane_a = first_a * _edge_step(k_rev, True, n)
    lane_b = first_a * _edge_step(g0_rev, True, n)
    lane_one = tl.full(lane_a.shape, 1.0, tl.float32)
    _, _, _, carry = tl.associative_scan((lane_a, lane_b, lane_one, tl.zeros_like(lane_a)), 0, _adjoint_combine,
                                         reverse=True)
    return _reversed_steps(k_rev, n) * carry[:, :, None] + _reversed_steps(g0_rev, n)


@triton.jit
def _channel_param(ptr, d, ch_ok, stride, first, first_ok, BLOCK_D: tl.constexpr):
    """A per-channel parameter shaped to broadcast over (LANES_T, BLOCK_D, STEPS) tiles; zero for absent
    channels. With one channel a block it is a scalar: a (BLOCK_D,) tensor would be laid out once for
    each consumer's layout, and everything computed from it (softplus, decay) computed once in each."""
    if BLOCK_D == 1:
        value = tl.load(ptr + first * stride, mask=first_ok, other=0.0)
    else:
        value = tl.load(ptr + d * stride, mask=ch_ok, other=0.0)[None, :, None]
    return value


@triton.jit
def _rows_bwd_kernel(gy_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, du_ptr, ddt_ptr, dA_ptr,
                     dB_ptr, dC_ptr, dD_ptr, dbias_ptr, L, CG, KC,
                     sg_b, sg_d, sg_l, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sB_b, sB_k, sB_l,
                     sC_b, sC_k, sC_l, sD, sbias, sdu_b, sdu_d, sdB_b, sdB_k, sdB_blk,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
                     LANES_T: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr,
                     ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr, ALIGN: tl.constexpr):
    """Gradients of ROW_BLOCKS blocks of BLOCK_D channels of group k of batch element b (grid: program,
    group, batch): du, ddelta; per channel dA, dD, dbias; dB / dC summed over the program's channels.
    ALIGN: L and the row strides are multiples of it (the launch checked); from STEPS up, each lane's
    steps load and store as one vector (WHOLE)."""
    WHOLE: tl.constexpr = ALIGN >= STEPS
    L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, _, sC_b, sC_k, _ = _aligned_inputs(
        L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, 0, sC_b, sC_k, 0, ALIGN)
    sg_b, sg_d = _aligned(sg_b, ALIGN), _aligned(sg_d, ALIGN)
    sdu_b, sdu_d = _aligned(sdu_b, ALIGN), _aligned(sdu_d, ALIGN)
    sdB_b, sdB_k, sdB_blk = _aligned(sdB_b, ALIGN), _aligned(sdB_k, ALIGN), _aligned(sdB_blk, ALIGN)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = (tl.arange(0, LANES_T) * STEPS)[:, None] + tl.zeros((1, BLOCK_D), tl.int32)
    lane_d = tl.arange(0, BLOCK_D)
    B_lanes = B_ptr + b * sB_b + k * sB_k + pos * sB_l
    C_lanes = C_ptr + b * sC_b + k * sC_k + pos * sC_l
    everywhere = pos >= 0
    Bt = _load_steps(B_lanes, pos, everywhere, L, sB_l, STEPS, 0, 1, WHOLE)
    Ct = _load_steps(C_lanes, pos, everywhere, L, sC_l, STEPS, 0, 1, WHOLE)
    dB_acc = tl.zeros((LANES_T, BLOCK_D, STEPS), tl.float32)
    dC_acc = tl.zeros((LANES_T, BLOCK_D, STEPS), tl.float32)
    for blk in tl.range(0, ROW_BLOCKS, num_stages=STAGES):
        c_first = (pid * ROW_BLOCKS + blk) * BLOCK_D  # the block's first channel within the group
        c_in = c_first + lane_d
        ch_ok = c_in < CG
        d = k * CG + c_in
        first, first_ok = k * CG + c_first, c_first < CG
        A = _channel_param(A_ptr, d, ch_ok, sA_d, first, first_ok, BLOCK_D)
        ok = everywhere & ch_ok[None, :]
        u = _load_steps(u_ptr + b * su_b + d[None, :] * su_d + pos * su_l, pos, ok, L, su_l, STEPS, 0, 1, WHOLE)
        raw = _load_steps(dt_ptr + b * sdt_b + d[None, :] * sdt_d + pos * sdt_l, pos, ok, L, sdt_l, STEPS, 0, 1, WHOLE)
        gy = _load_steps(gy_ptr + b * sg_b + d[None, :] * sg_d + pos * sg_l, pos, ok, L, sg_l, STEPS, 0, 1, WHOLE)
        if HAS_BIAS:
            raw += _channel_param(bias_ptr, d, ch_ok, sbias, first, first_ok, BLOCK_D)
        dt = raw
        slope = tl.full(raw.shape, 1.0, tl.float32)
        if SOFTPLUS:
            dt, slope = _softplus_and_slope(raw, FAST)
        inside = (pos[:, :, None] + tl.arange(0, STEPS)[None, None, :] < L) & ch_ok[None, :, None]
        dt = tl.where(inside, dt, 0.0)
        a = _exp2(dt * (A * 1.4426950408889634), FAST)
        dtu = dt * u
        x = dtu * Bt
        h = _states(a, x)
        g = _adjoints(a, Ct * gy)
        gl = g * (h - x)  # g_t a_t h_{t-1}: the gradient with respect to Δ_t A
        gB = g * Bt
        ddt = (gl * A + gB * u) * slope
        du = gB * dt
        if HAS_D:
            du += _channel_param(D_ptr, d, ch_ok, sD, first, first_ok, BLOCK_D) * gy
            tl.store(dD_ptr + b * KC + d, tl.sum(tl.sum(gy * u, 2), 0), mask=ch_ok)
        tl.store(dA_ptr + b * KC + d, tl.sum(tl.sum(gl * dt, 2), 0), mask=ch_ok)
        if HAS_BIAS:
            tl.store(dbias_ptr + b * KC + d, tl.sum(tl.sum(ddt, 2), 0), mask=ch_ok)
        _store_steps(du_ptr + b * sdu_b + d[None, :] * sdu_d + pos, pos, ok, L, 1,
                     du.to(du_ptr.dtype.element_ty), STEPS, 0, 1, WHOLE)
        _store_steps(ddt_ptr + b * sdu_b + d[None, :] * sdu_d + pos, pos, ok, L, 1,
                     ddt.to(ddt_ptr.dtype.element_ty), STEPS, 0, 1, WHOLE)
        dB_acc += g * dtu
        dC_acc += h * gy
    dBC = b * sdB_b + k * sdB_k + pid * sdB_blk + pos
    first_lane = lane_d[None, :] == 0  # one channel lane stores the sums
    _store_steps(dB_ptr + dBC, pos, first_lane, L, 1, tl.broadcast_to(tl.sum(dB_acc, 1, keep_dims=True), dB_acc.shape),
                 STEPS, 0, 1, WHOLE)
    _store_steps(dC_ptr + dBC, pos, first_lane, L, 1, tl.broadcast_to(tl.sum(dC_acc, 1, keep_dims=True), dC_acc.shape),
                 STEPS, 0, 1, WHOLE)


def _steps_alignment(length: int, *tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing L and the batch and row strides of the (batch, rows, L)
    tensors (elements), for the kernel's ALIGN; 1 where one is not contiguous along L. Unlike
    :func:`.selective_scan._row_alignment` it reports 16 too: a lane's steps are no multiple of 16 that
    Triton's launcher would see by itself."""
    if any(t.stride(-1) != 1 for t in tensors):
        return 1
    return common_alignment([length] + [s for t in tensors for s in t.stride()[:2]])


def rows_bwd_applies(state: int, length: int, lanes_t: int, steps: int) -> bool:
    """Whether :func:`rows_bwd` takes a scan: one state, and rows that fit the lanes' steps."""
    return state == 1 and 0 < length <= lanes_t * steps and steps >= 2 and steps & (steps - 1) == 0


def rows_bwd(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, grad_dtypes: tuple[torch.dtype, torch.dtype],
             lanes_t: int, block_d: int, steps: int, row_blocks: int, stages: int = 1, num_warps: int = 1,
             options: dict | None = None, vectors: bool = True):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of the d_state-1 scan by whole rows held as
    ``steps`` consecutive positions in each of ``lanes_t`` lanes per channel, ``row_blocks`` blocks of
    ``block_d`` channels a program of ``num_warps`` warps (with more lanes than a warp's 32 threads hold,
    a thread holds several). ``vectors``: where L and the rows are aligned to ``steps`` elements, each
    lane's steps move as one vector. du and ddelta are stored in ``grad_dtypes``; the rest are float32,
    dD / ddelta_bias None where D / delta_bias are. ``options``: Triton launch options besides num_warps
    (a register cap)."""
    batch, channels, length = u.shape
    groups = B.shape[1]
    cg = channels // groups
    dev, f32 = u.device, torch.float32
    du = torch.empty(batch, channels, length, device=dev, dtype=grad_dtypes[0])
    ddelta = torch.empty(batch, channels, length, device=dev, dtype=grad_dtypes[1])
    # per-program partials, summed below in one launch: dA, dD, dbias over the batch, dB and dC over programs
    n_sums = 1 + (D is not None) + (delta_bias is not None)
    parts = torch.empty(n_sums, 1, batch, channels, device=dev, dtype=f32)
    dA_part = parts[0, 0]
    dD_part = parts[1, 0] if D is not None else dA_part
    dbias_part = parts[-1, 0] if delta_bias is not None else dA_part
    n_prog = cdiv(cg, block_d * row_blocks)
    bc_ws = torch.empty(2, batch * groups, n_prog, length, device=dev, dtype=f32)
    dB_ws, dC_ws = (ws.view(batch, groups, n_prog, length) for ws in bc_ws)
    Dt = D if D is not None else dA_part
    bt = delta_bias if delta_bias is not None else dA_part
    align = _steps_alignment(length, grad_out, u, delta, du, B[:, :, 0], C[:, :, 0]) if vectors else 1
    _rows_bwd_kernel[(n_prog, groups, batch)](
        grad_out, u, delta, A, B, C, Dt, bt, du, ddelta, dA_part, dB_ws, dC_ws, dD_part, dbias_part,
        length, cg, channels, *grad_out.stride(), *u.stride(), *delta.stride(), A.stride(0),
        B.stride(0), B.stride(1), B.stride(3), C.stride(0), C.stride(1), C.stride(3), Dt.stride(0), bt.stride(0),
        du.stride(0), du.stride(1), dB_ws.stride(0), dB_ws.stride(1), dB_ws.stride(2),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), FAST=fast_math(u),
        LANES_T=lanes_t, BLOCK_D=block_d, STEPS=steps, ROW_BLOCKS=row_blocks, STAGES=stages, ALIGN=align,
        **{**(options or {}), "num_warps": num_warps},
    )
    (dB, dC), (dA, *skip) = sum_partials(bc_ws, parts)
    dD = skip[0].view(channels) if D is not None else None
    dbias = skip[-1].view(channels) if delta_bias is not None else None
    return (du, ddelta, dA.view(channels, 1), dB.view(batch, groups, 1, length), dC.view(batch, groups, 1, length),
            dD, dbias)

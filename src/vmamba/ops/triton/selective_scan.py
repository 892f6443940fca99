"""Selective scan forward and backward as Triton kernels.

Equations (per batch b, channel d of group k = d // C, state index n, position t):

    Δ_t = softplus(delta_t + bias),  a_t = exp(Δ_t A_n),  x_t = Δ_t u_t B_{k,n,t}
    h_t = a_t h_{t-1} + x_t,  y_t = Σ_n C_{k,n,t} h_t + D u_t

Each program owns a block of channels of one group of one batch element and walks L in chunks of
BLOCK_T positions. A chunk is loaded as (BLOCK_T, BLOCK_D) tiles (B and C as (BLOCK_T, BLOCK_N)
tiles shared by the block's channels); register tiles are (T, D, N) with time slowest, so each thread
owns one (channel, state) pair and its BLOCK_T steps, and ``tl.associative_scan`` over the (a, x)
pairs along time compiles to a sequential loop in registers. The (BLOCK_D, BLOCK_N) state is carried
from chunk to chunk in registers. Every input is read once and the output written once.

Short rows at d_state 1 (up to L 256) are taken whole: the forward packs them end to end
(:mod:`.selective_scan_packed`; as one chunk of (T, D) tiles with time across the lanes where packing
does not apply), and the backward holds consecutive steps in each lane (configuration key STEPS,
:mod:`.selective_scan_rows`) and starts every row from a zero state, so the forward keeps no states
for it.

Backward: the adjoint state g_t = C_t gy_t + a_{t+1} g_{t+1} runs the same recurrence in reverse.
The kernel first walks L forwards storing the state at the start of each chunk (a small workspace,
(batch, n_chunks, KC, N) float32), then walks the chunks in reverse, recomputing the chunk's states
from its start state and scanning the adjoint backwards (``reverse=True``, or with FLIP as a forward
scan of the time-flipped chunk). With LANES tiles ((T, N, D): one lane per channel and all its states;
the default for d_state 3-16) the chunks are 2-4 positions long and the workspace holds the state
every LANES_SAVE_INTERVAL positions; each interval's chunk-entry states are recomputed into a
per-program scratch before its chunks are walked. With
a_t h_{t-1} = h_t - x_t no shifted copy of h is needed. (T, D, N) tiles run the adjoint scan on
w_t = a_t g_t (g_t = C_t gy_t + w_{t+1}), which needs each position's own decay only; LANES tiles
recompute a_{t+1} from delta at t+1 instead, as carrying w costs them register spills
(``_adjoint_chunk``, ``_adjoint_chunk_next``). Then

    dA_n   = Σ_t g_t (h_t - x_t) Δ_t
    dΔ_t   = Σ_n [g_t (h_t - x_t) A_n + g_t B_t u_t]
    du_t   = Σ_n g_t B_t Δ_t + D gy_t
    dB_t   = Σ_{d in group} g_t Δ_t u_t,   dC_t = Σ_{d in group} h_t gy_t
    dD     = Σ gy u,   ddelta = dΔ σ(delta + bias) (softplus),   dbias = Σ ddelta

dA, dD and dbias are accumulated per program and reduced over the batch by a deterministic sum.
dB and dC are reduced over the channel blocks of a group through a per-block workspace summed after
(deterministic), or with atomics when that workspace would be too large and determinism is not asked.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials

LOG2E = 1.4426950408889634
# Positions between the states a LANES backward keeps (its chunks of 2-4 positions fit inside).
LANES_SAVE_INTERVAL = 16
# Largest dB/dC per-block workspace (bytes) before the backward falls back to atomics (non-deterministic
# mode only); VMAMBA_SCAN_WORKSPACE_GIB overrides.
WORKSPACE_LIMIT_BYTES = int(float(os.environ.get("VMAMBA_SCAN_WORKSPACE_GIB", "8")) * 2**30)

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "default_config", "saved_states_shape"]


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _adjoint_combine(a1, b1, k1, c1, a2, b2, k2, c2):
    """Compose two adjoint steps, each an affine map of the carry w entering it: it passes on a w + b
    and reads out g = k w + c (one position: a = a_t, b = a_t c_t, k = 1, c = c_t)."""
    return a2 * a1, a2 * b1 + b2, k2 * a1, k2 * b1 + c2


@triton.jit
def _log2_approx(x):
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x. FAST bit 1 (compiled CUDA, :func:`fast_math`): the hardware approximation with results below
    2^-126 flushed to zero (ex2.approx.ftz), one instruction; without .ftz, ptxas wraps it in a compare
    and two predicated multiplies to keep subnormal results (3 of the bf16 forward's 36 instructions per
    step, twice). A decay or an e^x that small is 0 to float32 precision in every sum it enters."""
    if FAST % 2 == 1:
        out = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 x: the hardware approximation with FAST bit 1 (:func:`fast_math`)."""
    if FAST % 2 == 1:
        out = _log2_approx(x)
    else:
        out = tl.log2(x)
    return out


@triton.jit
def _softplus_and_slope(x, FAST: tl.constexpr):
    """(log(1 + e^x), its derivative σ(x) = e^x / (1 + e^x)) from one exponential; kernels that use only
    the first leave the division out (FAST: :func:`fast_math`'s flags).

    Inputs of 2 bytes (FAST bit 2): max(x, 0) + log(1 + e^-|x|), no series and no selects (the packed
    forward: 446 instructions a thread of 8 elements against 486, sass_scan.py), with an absolute error
    of about 2e-7 at most (the hardware log2 and rounding 1 + e), far below what rounding delta to 8 or
    11 bits already moves softplus by. Otherwise, compiled (bit 1): the hardware log2 where 1 + e^x is
    not close to 1 (absolute error ~1e-7 there, relative below 2e-5) and log1p's series below 2^-7
    (relative error below e^3/4), instead of libdevice's branchy logf."""
    if FAST >= 2:
        e = _exp2(-tl.abs(x) * 1.4426950408889634, FAST)  # e^-|x|, in (0, 1]
        sp = tl.maximum(x, 0.0) + _log2(1.0 + e, FAST) * 0.6931471805599453
        r = tl.fdiv(1.0, 1.0 + e)
        slope = tl.where(x > 0.0, r, e * r)
    else:
        e = _exp2(tl.minimum(x, 20.0) * 1.4426950408889634, FAST)
        if FAST == 1:
            series = e * (1.0 - e * (0.5 - e * 0.3333333333333333))
            sp = tl.where(e < 0.0078125, series, _log2_approx(1.0 + e) * 0.6931471805599453)
        else:
            sp = tl.log(1.0 + e)
        slope = tl.fdiv(e, 1.0 + e)  # the approximate division is ample here
        sp = tl.where(x > 20.0, x, sp)
        slope = tl.where(x > 20.0, 1.0, slope)
    return sp, slope


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """log(1 + e^x) (see :func:`_softplus_and_slope`)."""
    sp, _ = _softplus_and_slope(x, FAST)
    return sp


@triton.jit
def _load_delta(dt_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """Returns (dΔ/d(delta + bias), Δ) for a (T, D) tile (the slope is 1 without softplus); Δ is zero
    outside the mask."""
    raw = tl.load(dt_ptrs, mask=mask, other=0.0).to(tl.float32)
    return _delta_of(raw, mask, bias, HAS_BIAS, SOFTPLUS, FAST)


@triton.jit
def _delta_of(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """(slope, Δ) of a loaded (T, D) tile of raw delta (see :func:`_load_delta`)."""
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    slope = tl.full(raw.shape, 1.0, tl.float32)
    if SOFTPLUS:
        dt, slope = _softplus_and_slope(raw, FAST)
    return slope, tl.where(mask, dt, 0.0)


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """A stride or length, declared a multiple of ALIGN elements (a power of two the launch checked):
    Triton's launcher only tells multiples of 16 from the rest, so rows of L = 196 (14²) 2-byte elements
    would otherwise be read and written one element at a time instead of in 8-byte vectors."""
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN  # exact; written so because the compiler tracks its divisibility
    return stride


@triton.jit
def _aligned_inputs(L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, ALIGN: tl.constexpr):
    """The length and the row strides of u, delta, B and C, through :func:`_aligned`."""
    return (_aligned(L, ALIGN), _aligned(su_b, ALIGN), _aligned(su_d, ALIGN), _aligned(sdt_b, ALIGN),
            _aligned(sdt_d, ALIGN), _aligned(sB_b, ALIGN), _aligned(sB_k, ALIGN), _aligned(sB_n, ALIGN),
            _aligned(sC_b, ALIGN), _aligned(sC_k, ALIGN), _aligned(sC_n, ALIGN))


@triton.jit
def _in_range(index, bound, EVEN: tl.constexpr):
    """index < bound; EVEN: the launch guarantees it (whole chunks and channel blocks), so the mask is a
    constant the compiler drops from loads, stores and selects."""
    if EVEN:
        inside = tl.full(index.shape, 1, tl.int1)
    else:
        inside = index < bound
    return inside


@triton.jit
def _load_chunk(u_base, dt_base, B_base, C_base, t, L, mask_d, mask_n, su_l, sdt_l, sB_l, sC_l, EVEN: tl.constexpr):
    """(T, D) tiles of u and raw delta, (T, N) tiles of B and C at positions t (float32, 0 outside)."""
    mask_t = _in_range(t, L, EVEN)
    m2 = mask_t[:, None] & mask_d[None, :]
    mtn = mask_t[:, None] & mask_n[None, :]
    u = tl.load(u_base + t[:, None] * su_l, mask=m2, other=0.0).to(tl.float32)
    raw = tl.load(dt_base + t[:, None] * sdt_l, mask=m2, other=0.0).to(tl.float32)
    Bt = tl.load(B_base + t[:, None] * sB_l, mask=mtn, other=0.0).to(tl.float32)
    Ct = tl.load(C_base + t[:, None] * sC_l, mask=mtn, other=0.0).to(tl.float32)
    return u, raw, Bt, Ct


@triton.jit
def _scan_chunk(a, x, h, first, last):
    """States of one chunk given the state h entering it; returns (states, state leaving it)."""
    x = tl.where(first, x + a * tl.expand_dims(h, 0), x)
    _, hs = tl.associative_scan((a, x), 0, _combine)
    h = tl.sum(tl.where(last, hs, 0.0), axis=0)
    return hs, h


@triton.jit
def _adjoint_chunk(a, c, w, first, last, FLIP: tl.constexpr):
    """Adjoint states g_t = c_t + a_{t+1} g_{t+1} of one chunk, run down the positions.

    The carry is w = a_{t+1} g_{t+1} from the chunk after it, and the chunk passes on a_t0 g_t0 to
    the one before: written as g_t = c_t + w_{t+1}, w_t = a_t g_t, every step uses its own decay, so
    a_{t+1} is neither reloaded nor recomputed. Returns (g, carry for the chunk before).

    FLIP runs the scan as a forward scan of the time-flipped chunk instead of
    ``associative_scan(reverse=True)``: time is held in registers, so the flips are free, while the
    reverse scan compiles to warp shuffles (tests/aot_kernels.py --sass).
    """
    c = tl.where(last, c + tl.expand_dims(w, 0), c)
    b = a * c
    k = tl.full(a.shape, 1.0, tl.float32)
    if FLIP:
        _, wf, _, gf = tl.associative_scan((tl.flip(a, 0), tl.flip(b, 0), k, tl.flip(c, 0)), 0, _adjoint_combine)
        g = tl.flip(gf, 0)
        w = tl.sum(tl.where(last, wf, 0.0), axis=0)
    else:
        _, ws, _, g = tl.associative_scan((a, b, k, c), 0, _adjoint_combine, reverse=True)
        w = tl.sum(tl.where(first, ws, 0.0), axis=0)
    return g, w


@triton.jit
def _adjoint_chunk_next(an, c, g, first, last, FLIP: tl.constexpr):
    """Adjoint states g_t = c_t + an_t g_{t+1} of one chunk from the successors' decays an_t = a_{t+1}
    and the carry g from the chunk after it; returns (g, carry g_t0 for the chunk before)."""
    c = tl.where(last, c + an * tl.expand_dims(g, 0), c)
    if FLIP:
        _, gf = tl.associative_scan((tl.flip(an, 0), tl.flip(c, 0)), 0, _combine)
        gs = tl.flip(gf, 0)
        g = tl.sum(tl.where(last, gf, 0.0), axis=0)
    else:
        _, gs = tl.associative_scan((an, c), 0, _combine, reverse=True)
        g = tl.sum(tl.where(first, gs, 0.0), axis=0)
    return gs, g


@triton.jit
def _save_entry_state(h, t0, base, stride, mask, SAVE_T: tl.constexpr, EVERY_CHUNK: tl.constexpr):
    """Store the state h entering the chunk at t0 if a saving interval of SAVE_T steps starts there
    (EVERY_CHUNK: the chunk length is a multiple of SAVE_T, so one starts at every chunk)."""
    if EVERY_CHUNK:
        tl.store(base + (t0 // SAVE_T) * stride, h, mask=mask)
    else:
        if t0 % SAVE_T == 0:
            tl.store(base + (t0 // SAVE_T) * stride, h, mask=mask)


@triton.jit
def _save_inner_states(hs, t0, offs_t, L, base, stride, mask, SAVE_T: tl.constexpr, BLOCK_T: tl.constexpr,
                       FLAT: tl.constexpr = False):
    """Store the states entering the saving intervals that start inside a chunk (BLOCK_T > SAVE_T)."""
    for j in tl.static_range(1, BLOCK_T // SAVE_T):
        hj = tl.sum(tl.where(_time_column(offs_t == j * SAVE_T - 1, FLAT), hs, 0.0), axis=0)
        tl.store(base + (t0 // SAVE_T + j) * stride, hj, mask=mask & (t0 + j * SAVE_T < L))


@triton.jit
def _per_channel(t, LANES: tl.constexpr, FLAT: tl.constexpr = False):
    """A (T, D) tile broadcast into the tile layout: (T, D, 1), or (T, 1, D) for LANES tiles (T, N, D);
    FLAT tiles (d_state 1) are (T, D) already."""
    if FLAT:
        out = t
    elif LANES:
        out = t[:, None, :]
    else:
        out = t[:, :, None]
    return out


@triton.jit
def _per_state(t, LANES: tl.constexpr, FLAT: tl.constexpr = False):
    """A (T, N) tile broadcast into the tile layout: (T, 1, N), or (T, N, 1) for LANES tiles; FLAT
    tiles take the (T, 1) tile as it is."""
    if FLAT:
        out = t
    elif LANES:
        out = t[:, :, None]
    else:
        out = t[:, None, :]
    return out


@triton.jit
def _time_column(t, FLAT: tl.constexpr = False):
    """A (T,) tile as a time column of the tile layout: (T, 1, 1), or (T, 1) for FLAT tiles."""
    if FLAT:
        out = t[:, None]
    else:
        out = t[:, None, None]
    return out


@triton.jit
def _over_states(t, LANES: tl.constexpr, FLAT: tl.constexpr = False):
    """Sum of a tile over its states: (T, D) (FLAT tiles have one state, so nothing to sum)."""
    if FLAT:
        out = t
    else:
        out = tl.sum(t, axis=2 - LANES)
    return out


@triton.jit
def _over_channels(t, LANES: tl.constexpr, FLAT: tl.constexpr = False):
    """Sum of a tile over the block's channels: (T, N)."""
    if FLAT:
        out = tl.sum(t, axis=1)[:, None]
    else:
        out = tl.sum(t, axis=1 + LANES)
    return out


@triton.jit
def _lane_xor(x, MASK: tl.constexpr, SHUFFLE: tl.constexpr):
    """x (T, M, D) with its last axis permuted d -> d ^ MASK. SHUFFLE (compiled CUDA, where that axis is
    the warp's lanes in order, its low lane bits with 16 channels: LANES tiles of one warp): a butterfly
    shuffle; else (the interpreter) the same permutation by reshapes."""
    if SHUFFLE:
        mask = tl.full(x.shape, MASK, tl.int32)  # a constant: ptxas makes it the instruction's immediate
        out = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=f,f,r", [x, mask],
                                        dtype=tl.float32, is_pure=False, pack=1)
    else:
        T: tl.constexpr = x.shape[0]
        M: tl.constexpr = x.shape[1]
        D: tl.constexpr = x.shape[2]
        halves = tl.reshape(x, (T, M, D // (2 * MASK), 2, MASK))
        out = tl.reshape(tl.flip(halves, 3), (T, M, D))
    return out


@triton.jit
def _halve(x, lane, MASK: tl.constexpr, SHUFFLE: tl.constexpr):
    """One step of :func:`_halving_sums` at lane bit MASK for the (T, M, D) values x."""
    T: tl.constexpr = x.shape[0]
    M: tl.constexpr = x.shape[1]
    D: tl.constexpr = x.shape[2]
    if M > 1:
        lo, hi = tl.split(tl.permute(tl.reshape(x, (T, 2, M // 2, D)), (0, 2, 3, 1)))
        upper = (lane & MASK) != 0
        out = tl.where(upper, hi, lo) + _lane_xor(tl.where(upper, lo, hi), MASK, SHUFFLE)
    else:
        out = x + _lane_xor(x, MASK, SHUFFLE)
    return out


@triton.jit
def _halving_sums(xb, xc, SHUFFLE: tl.constexpr):
    """Sums over the D channel lanes of the 2N values [xb; xc] (two (T, N, D) LANES tiles, 2N <= 32) at
    each step, by recursive halving: at lane bit m = D / 2, D / 4, ... each lane keeps the half of its
    values that the bit selects and adds its partner's copy of that half; once one value is left,
    butterfly adds. Returns (T, 32), laid out as :func:`_halved_lanes` says.

    D = 32: lane d holds the sum of value d // (16 / N) (dB's state n below N, else dC's n - N); 31
    shuffles for 32 sums, where a butterfly sum of each takes 5 (160), and as many adds. D = 16 (N = 16,
    whose states Triton spreads over two lanes a channel, n's parity on lane bit 4): 8 + 4 + 2 + 1
    shuffles for the 16 values each lane holds, and the last halving leaves each lane one value."""
    T: tl.constexpr = xb.shape[0]
    D: tl.constexpr = xb.shape[2]
    lane = tl.arange(0, D)[None, None, :]
    upper = (lane & (D // 2)) != 0
    x = tl.where(upper, xc, xb) + _lane_xor(tl.where(upper, xb, xc), D // 2, SHUFFLE)
    if D == 32:
        x = _halve(x, lane, 8, SHUFFLE)
    x = _halve(_halve(_halve(x, lane, 4, SHUFFLE), lane, 2, SHUFFLE), lane, 1, SHUFFLE)
    return tl.reshape(x, (T, 32))


@triton.jit
def _halved_lanes(N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr = 32):
    """Per column of :func:`_halving_sums`' (T, 32) tile: (1 where its value is dC's, else 0; the value's
    state; whether the column is stored: the first of the lanes holding its value, states from N
    masked). With 16 channel lanes, column m·16 + d holds dC's (bit 3 of d) or dB's sum of state
    m + 2 (d & 1) + 4 (d >> 1 & 1) + 8 (d >> 2 & 1): the halvings at lane bits 2, 1, 0 kept the upper
    8, 4 and 2 states where the bit is set."""
    column = tl.arange(0, 32)
    if BLOCK_D == 16:
        d = column % 16
        is_c = (d >> 3) & 1
        n = column // 16 + 2 * (d & 1) + 4 * ((d >> 1) & 1) + 8 * ((d >> 2) & 1)
        keep = n < N
    else:
        SHARE: tl.constexpr = 16 // BLOCK_N  # lanes holding each value
        v = column // SHARE
        is_c = (v >= BLOCK_N).to(tl.int32)
        n = v - is_c * BLOCK_N
        keep = (column % SHARE == 0) & (n < N)
    return is_c, n, keep


@triton.jit
def _store_halved_dBC(dB_ptr, dC_ptr, offset, t, L, sums, N, BLOCK_N: tl.constexpr, sdB_n, ATOMIC: tl.constexpr,
                      EVEN: tl.constexpr, BLOCK_D: tl.constexpr = 32):
    """Stores (or with ATOMIC adds) :func:`_halving_sums`' (T, 32) tile at positions t (dB and dC in
    separate arrays, states n at stride sdB_n)."""
    is_c, n, keep = _halved_lanes(N, BLOCK_N, BLOCK_D)
    ptr = tl.where(is_c != 0, dC_ptr, dB_ptr) + offset + n * sdB_n
    m = _in_range(t, L, EVEN)[:, None] & keep[None, :]
    if ATOMIC:
        tl.atomic_add(ptr[None, :] + t[:, None], sums, mask=m)
    else:
        tl.store(ptr[None, :] + t[:, None], sums, mask=m)


@triton.jit
def _chunk_gradients(gs, hs, x, dt, dtu, u, gy, slope, A, A2, Bt, dskip, m2, HAS_D: tl.constexpr,
                     SOFTPLUS: tl.constexpr, LANES: tl.constexpr, FLAT: tl.constexpr = False,
                     HALVING: tl.constexpr = 0):
    """Gradient terms of one chunk from its adjoint states gs and states hs (module docstring).

    Returns the chunk's dA and dD partial sums, the (T, D) tiles du and ddelta (with respect to the
    raw delta + bias, masked) and the (T, N) dB and dC summed over the block's channels. Tiles are
    (T, D, N) with A (D, N), or with LANES (T, N, D) with A (N, D): the sums over the states then
    stay within a thread; FLAT tiles (d_state 1) are (T, D) with A (D,); A2 = A·log2(e). LANES tiles
    take ddelta's sum over the states from A2, the decays' exponent they hold anyway, so that A need not
    stay in registers: 16 fewer at d_state 16, for one multiplication per (channel, step). HALVING
    (LANES tiles of one warp of 32 channels, or 16 at d_state 16; 2: by shuffles, 1: the interpreter's
    stand-in): dB and dC come back as one (T, 32) tile of :func:`_halving_sums`, returned twice.
    """
    gl = gs * (hs - x)  # g_t a_t h_{t-1}: gradient with respect to Δ_t A
    dA = tl.sum(gl * _per_channel(dt, LANES, FLAT), axis=0)
    gB = _over_states(gs * _per_state(Bt, LANES, FLAT), LANES, FLAT)
    if LANES:
        ddt = _over_states(gl * tl.expand_dims(A2, 0), LANES) * 0.6931471805599453 + gB * u
    else:
        ddt = _over_states(gl * tl.expand_dims(A, 0), LANES, FLAT) + gB * u
    du = gB * dt
    dD = tl.zeros_like(dskip)
    if HAS_D:
        du += dskip[None, :] * gy
        dD = tl.sum(gy * u, axis=0)
    if SOFTPLUS:
        ddt = ddt * slope  # σ(delta + bias)
    ddt = tl.where(m2, ddt, 0.0)
    if HALVING:
        dB = _halving_sums(gs * _per_channel(dtu, LANES), hs * _per_channel(gy, LANES), HALVING > 1)
        dC = dB
    else:
        dB = _over_channels(gs * _per_channel(dtu, LANES, FLAT), LANES, FLAT)
        dC = _over_channels(hs * _per_channel(gy, LANES, FLAT), LANES, FLAT)
    return dA, dD, du, ddt, dB, dC


@triton.jit
def _state_grid(d, offs_n, mask_d, mask_n, LANES: tl.constexpr, FLAT: tl.constexpr = False):
    """(channel row, state, mask) index tiles of a (channel, state) state: (D, N), or (N, D) with LANES;
    (D,) for FLAT tiles (one state)."""
    if FLAT:
        rows = d
        states = offs_n
        mask = mask_d & mask_n
    elif LANES:
        rows = d[None, :]
        states = offs_n[:, None]
        mask = mask_n[:, None] & mask_d[None, :]
    else:
        rows = d[:, None]
        states = offs_n[None, :]
        mask = mask_d[:, None] & mask_n[None, :]
    return rows, states, mask


# Register tiles are laid out (T, D, N): time is the slowest axis, so with BLOCK_D * BLOCK_N at least
# the number of threads, every thread holds all BLOCK_T steps of its (d, n) pairs and the associative
# scan along axis 0 runs as a plain sequential loop in registers (no shuffles). With fewer pairs than
# threads, Triton's 3-D layout interleaves the steps of the lanes that share a pair; FLAT (T, D) tiles
# (d_state 1) keep the layout of their loads instead, a run of consecutive steps per lane.


@triton.jit
def _state_zeros(BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, FLAT: tl.constexpr):
    """A zero (channel, state) tile in the layout of :func:`_state_grid`."""
    if FLAT:
        out = tl.zeros((BLOCK_D,), tl.float32)
    elif LANES:
        out = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    else:
        out = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    return out


@triton.jit
def _walked_block(it, steps, CG, G, n_batch, BLOCK_D: tl.constexpr):
    """(step within the block, channel block within the group, group, batch element) of iteration ``it``
    of a PERSIST loop, in which program p walks the blocks p, p + programs, ... for ``steps`` iterations
    each; iterations past the last block redo it."""
    j = it // steps
    n_blk_d = tl.cdiv(CG, BLOCK_D)
    blk = tl.minimum(j * tl.num_programs(0) + tl.program_id(0), n_blk_d * G * n_batch - 1)
    rest = blk // n_blk_d
    return it - j * steps, blk - rest * n_blk_d, rest % G, (rest // G).to(tl.int64)


@triton.jit
def _block_inputs(pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, B_ptr, C_ptr, hws_ptr,
                  su_b, su_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  LANES: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr):
    """What both kernels need of one channel block: its channel rows d, state indices, masks, the
    (channel, state) grid, A, bias and D, and the row pointers of u, delta, B, C and the kept states."""
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = _in_range(offs_c, CG, EVEN)
    d = (k * CG + offs_c).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = _in_range(offs_n, N, EVEN)
    rows, states, state_mask = _state_grid(d, offs_n, mask_d, mask_n, LANES, FLAT)
    A = tl.load(A_ptr + rows * sA_d + states * sA_n, mask=state_mask, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * sbias, mask=mask_d, other=0.0).to(tl.float32)
    dskip = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + d * sD, mask=mask_d, other=0.0).to(tl.float32)
    u_base = u_ptr + b * su_b + d[None, :] * su_d
    dt_base = dt_ptr + b * sdt_b + d[None, :] * sdt_d
    B_base = B_ptr + b * sB_b + k * sB_k + offs_n[None, :] * sB_n
    C_base = C_ptr + b * sC_b + k * sC_k + offs_n[None, :] * sC_n
    # interval-entry states: (batch, n_saved, KC, BLOCK_N), contiguous; a warp's channels side by side
    hws_base = hws_ptr + (b * n_saved * KC + rows) * BLOCK_N + states
    return (d, offs_n, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, B_base, C_base,
            hws_base)


@triton.jit
def _fwd_block(pid_d, k, b, CG, N, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, y_ptr, B_ptr, C_ptr, hws_ptr, n_saved, KC,
               su_b, su_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias, sy_b, sy_d,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               LANES: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr):
    """:func:`_block_inputs` for the forward: A·log2(e) and the row pointers of y."""
    d, offs_n, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, B_base, C_base, hws_base = \
        _block_inputs(pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, B_ptr, C_ptr,
                      hws_ptr, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias,
                      HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
    y_base = y_ptr + b * sy_b + d[None, :] * sy_d
    return (mask_d, mask_n, state_mask, A * 1.4426950408889634, bias, dskip, u_base, dt_base, y_base, B_base, C_base,
            hws_base)


@triton.jit
def _fwd_chunk(h, u, raw, Bt, Ct, t0, offs_t, L, mask_d, state_mask, A2, bias, dskip, y_base, hws_base,
               interval_stride, first, last, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, FAST: tl.constexpr, BLOCK_T: tl.constexpr, LANES: tl.constexpr,
               SAVE_T: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr):
    """Scans one loaded chunk (positions t0 + offs_t) from the state h entering it, stores its outputs
    (and with SAVE_T the states the backward keeps); returns the state leaving it."""
    t = offs_t + t0
    m2 = _in_range(t, L, EVEN)[:, None] & mask_d[None, :]
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw, FAST)
    dt = tl.where(m2, dt, 0.0)
    a = _exp2(_per_channel(dt, LANES, FLAT) * tl.expand_dims(A2, 0), FAST)
    x = _per_channel(dt * u, LANES, FLAT) * _per_state(Bt, LANES, FLAT)
    if SAVE_T > 0:
        _save_entry_state(h, t0, hws_base, interval_stride, state_mask, SAVE_T, BLOCK_T % SAVE_T == 0)
    hs, h = _scan_chunk(a, x, h, first, last)
    if SAVE_T > 0:
        _save_inner_states(hs, t0, offs_t, L, hws_base, interval_stride, state_mask, SAVE_T, BLOCK_T, FLAT)
    y = _over_states(hs * _per_state(Ct, LANES, FLAT), LANES, FLAT)
    if HAS_D:
        y += dskip[None, :] * u
    tl.store(y_base + t[:, None], y, mask=m2)
    return h


@triton.jit
def _ss_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, hws_ptr,
    L, N, CG, n_saved, G, n_batch, BLOCKS,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_k, sB_n, sB_l, sC_b, sC_k, sC_n, sC_l, sD, sbias, sy_b, sy_d,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, PREFETCH: tl.constexpr,
    LANES: tl.constexpr, SAVE_T: tl.constexpr, STAGES: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr, PERSIST: tl.constexpr,
):
    """Tiles (T, D, N), FLAT (T, D) for one state; with LANES (T, N, D): one lane owns one channel and
    all its states, so the sum over the states for y stays in the thread and Δ is computed once per
    channel. SAVE_T > 0 also stores the state entering every SAVE_T positions in the backward's workspace
    layout (batch, n_saved, KC, BLOCK_N), so that the backward can skip its first pass.

    PERSIST: a one-dimensional grid whose programs each walk BLOCKS channel blocks (program p the blocks
    p, p + programs, ...) as one loop over (block, chunk) pairs, so that Triton's pipeliner keeps the
    next block's first chunks in flight while a block's last chunk is scanned; short sequences (L = 196,
    49) otherwise expose each block's load latency. Surplus iterations past the last block redo it (the
    same values written twice)."""
    L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n = _aligned_inputs(
        L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, ALIGN)
    sy_b, sy_d = _aligned(sy_b, ALIGN), _aligned(sy_d, ALIGN)
    offs_t = tl.arange(0, BLOCK_T)
    KC = G * CG
    interval_stride = KC * BLOCK_N
    first = _time_column(offs_t == 0, FLAT)
    last = _time_column(offs_t == BLOCK_T - 1, FLAT)

    if PERSIST:
        n_chunks = tl.cdiv(L, BLOCK_T)
        h = _state_zeros(BLOCK_D, BLOCK_N, LANES, FLAT)
        for it in tl.range(0, BLOCKS * n_chunks, num_stages=STAGES):
            chunk, pid_d, k, b = _walked_block(it, n_chunks, CG, G, n_batch, BLOCK_D)
            t0 = chunk * BLOCK_T
            mask_d, mask_n, state_mask, A2, bias, dskip, u_base, dt_base, y_base, B_base, C_base, hws_base = \
                _fwd_block(pid_d, k, b, CG, N, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, y_ptr, B_ptr, C_ptr, hws_ptr,
                           n_saved, KC, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n,
                           sD, sbias, sy_b, sy_d, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
            h = tl.where(t0 == 0, 0.0, h)
            u, raw, Bt, Ct = _load_chunk(u_base, dt_base, B_base, C_base, offs_t + t0, L, mask_d, mask_n,
                                         su_l, sdt_l, sB_l, sC_l, EVEN)
            h = _fwd_chunk(h, u, raw, Bt, Ct, t0, offs_t, L, mask_d, state_mask, A2, bias, dskip, y_base,
                           hws_base, interval_stride, first, last, HAS_D, HAS_BIAS, SOFTPLUS, FAST, BLOCK_T,
                           LANES, SAVE_T, EVEN, FLAT)
    else:
        mask_d, mask_n, state_mask, A2, bias, dskip, u_base, dt_base, y_base, B_base, C_base, hws_base = \
            _fwd_block(tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), CG, N, A_ptr, D_ptr,
                       bias_ptr, u_ptr, dt_ptr, y_ptr, B_ptr, C_ptr, hws_ptr, n_saved, KC, su_b, su_d, sdt_b,
                       sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias, sy_b, sy_d, HAS_D,
                       HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
        h = tl.zeros(state_mask.shape, tl.float32)
        if PREFETCH:
            u_nx, raw_nx, B_nx, C_nx = _load_chunk(u_base, dt_base, B_base, C_base, offs_t, L, mask_d, mask_n,
                                                   su_l, sdt_l, sB_l, sC_l, False)
        # STAGES > 1: Triton's software pipeliner keeps that many chunks' loads in flight (asynchronous copies)
        for t0 in tl.range(0, L, BLOCK_T, num_stages=STAGES):
            if PREFETCH:
                # software pipelining: the next chunk's loads are in flight during this chunk's scan
                u, raw, Bt, Ct = u_nx, raw_nx, B_nx, C_nx
                u_nx, raw_nx, B_nx, C_nx = _load_chunk(u_base, dt_base, B_base, C_base, offs_t + t0 + BLOCK_T, L,
                                                       mask_d, mask_n, su_l, sdt_l, sB_l, sC_l, False)
            else:
                u, raw, Bt, Ct = _load_chunk(u_base, dt_base, B_base, C_base, offs_t + t0, L, mask_d, mask_n,
                                             su_l, sdt_l, sB_l, sC_l, EVEN)
            h = _fwd_chunk(h, u, raw, Bt, Ct, t0, offs_t, L, mask_d, state_mask, A2, bias, dskip, y_base,
                           hws_base, interval_stride, first, last, HAS_D, HAS_BIAS, SOFTPLUS, FAST, BLOCK_T,
                           LANES, SAVE_T, EVEN, FLAT)


@triton.jit
def _ss_state_after(h, t, L, u_base, dt_base, B_base, mask_d, mask_n, su_l, sdt_l, sB_l, bias, A2, first, last,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, LANES: tl.constexpr,
                    EVEN: tl.constexpr, FLAT: tl.constexpr):
    """The state after the chunk of positions t entered with state h (the backward's recomputation)."""
    mask_t = _in_range(t, L, EVEN)
    m2 = mask_t[:, None] & mask_d[None, :]
    mtn = mask_t[:, None] & mask_n[None, :]
    u = tl.load(u_base + t[:, None] * su_l, mask=m2, other=0.0).to(tl.float32)
    _, dt = _load_delta(dt_base + t[:, None] * sdt_l, m2, bias, HAS_BIAS, SOFTPLUS, FAST)
    Bt = tl.load(B_base + t[:, None] * sB_l, mask=mtn, other=0.0).to(tl.float32)
    a = _exp2(_per_channel(dt, LANES, FLAT) * tl.expand_dims(A2, 0), FAST)
    x = _per_channel(dt * u, LANES, FLAT) * _per_state(Bt, LANES, FLAT)
    _, h = _scan_chunk(a, x, h, first, last)
    return h


@triton.jit
def _ss_bwd_loads(t, L, u_base, dt_base, gy_base, B_base, C_base, mask_d, mask_n, su_l, sdt_l, sg_l, sB_l, sC_l,
                  EVEN: tl.constexpr):
    """The backward's (T, D) tiles of u, raw delta and gy and (T, N) tiles of B and C at positions t
    (zero at t >= L)."""
    u, raw, Bt, Ct = _load_chunk(u_base, dt_base, B_base, C_base, t, L, mask_d, mask_n, su_l, sdt_l, sB_l, sC_l,
                                 EVEN)
    m2 = _in_range(t, L, EVEN)[:, None] & mask_d[None, :]
    gy = tl.load(gy_base + t[:, None] * sg_l, mask=m2, other=0.0).to(tl.float32)
    return u, raw, gy, Bt, Ct


@triton.jit
def _ss_bwd_chunk(t, u, raw, gy, Bt, Ct, h0, g, L, dt_base, du_base, ddt_base,
                  mask_d, sdt_l, A, A2, bias, dskip, first, last, HAS_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
                  FLIP: tl.constexpr, LANES: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr,
                  HALVING: tl.constexpr = 0):
    """One chunk of the backward (positions t, its loaded tiles, entry state h0, adjoint carry g from
    the chunk after it): stores du and ddelta; returns (g for the chunk before, dA, dD, dbias partials,
    the (T, N) dB and dC summed over the block's channels)."""
    mask_t = _in_range(t, L, EVEN)
    m2 = mask_t[:, None] & mask_d[None, :]
    slope, dt = _delta_of(raw, m2, bias, HAS_BIAS, SOFTPLUS, FAST)

    a = _exp2(_per_channel(dt, LANES, FLAT) * tl.expand_dims(A2, 0), FAST)
    dtu = dt * u
    x = _per_channel(dtu, LANES, FLAT) * _per_state(Bt, LANES, FLAT)
    hs, _ = _scan_chunk(a, x, h0, first, last)
    cg = _per_state(Ct, LANES, FLAT) * _per_channel(gy, LANES, FLAT)
    if LANES:
        tn = t + 1
        m2n = (tn < L)[:, None] & mask_d[None, :]
        _, dtn = _load_delta(dt_base + tn[:, None] * sdt_l, m2n, bias, HAS_BIAS, SOFTPLUS, FAST)
        an = tl.where(_per_channel(m2n, LANES), _exp2(_per_channel(dtn, LANES) * A2[None, :, :], FAST), 0.0)
        gs, g = _adjoint_chunk_next(an, cg, g, first, last, FLIP)
    else:
        gs, g = _adjoint_chunk(a, cg, g, first, last, FLIP)

    dA_p, dD_p, du, ddt, dBp, dCp = _chunk_gradients(gs, hs, x, dt, dtu, u, gy, slope, A, A2, Bt, dskip, m2,
                                                     HAS_D, SOFTPLUS, LANES, FLAT, HALVING)
    tl.store(du_base + t[:, None], du, mask=m2)
    tl.store(ddt_base + t[:, None], ddt, mask=m2)
    return g, dA_p, dD_p, tl.sum(ddt, axis=0), dBp, dCp


@triton.jit
def _store_dBC(dB_base, dC_base, t, L, mask_n, dBp, dCp, ATOMIC: tl.constexpr, EVEN: tl.constexpr):
    """Stores (or with ATOMIC adds) a chunk's (T, N) dB and dC partials at positions t."""
    mtn = _in_range(t, L, EVEN)[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(dB_base + t[:, None], dBp, mask=mtn)
        tl.atomic_add(dC_base + t[:, None], dCp, mask=mtn)
    else:
        tl.store(dB_base + t[:, None], dBp, mask=mtn)
        tl.store(dC_base + t[:, None], dCp, mask=mtn)


@triton.jit
def _store_channel_partials(dA_ptr, dD_ptr, dbias_ptr, b, KC, N, rows, states, d, dA, dD, dbias, state_mask, mask_d,
                            HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Stores a channel block's dA, dD and dbias for batch element b (summed over the batch on the host)."""
    tl.store(dA_ptr + (b * KC + rows) * N + states, dA, mask=state_mask)
    if HAS_D:
        tl.store(dD_ptr + b * KC + d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * KC + d, dbias, mask=mask_d)


@triton.jit
def _bwd_block(pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, gy_ptr, du_ptr, ddt_ptr,
               B_ptr, C_ptr, dB_ptr, dC_ptr, hws_ptr, sg_b, sg_d, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n,
               sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias, sdu_b, sdu_d, sdB_b, sdB_k, sdB_blk, sdB_n,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               LANES: tl.constexpr, EVEN: tl.constexpr, FLAT: tl.constexpr):
    """:func:`_block_inputs` for the backward, with the row pointers of gy, du, ddelta and the dB / dC
    partials."""
    d, offs_n, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, B_base, C_base, hws_base = \
        _block_inputs(pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, B_ptr, C_ptr,
                      hws_ptr, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias,
                      HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
    gy_base = gy_ptr + b * sg_b + d[None, :] * sg_d
    du_base = du_ptr + b * sdu_b + d[None, :] * sdu_d
    ddt_base = ddt_ptr + b * sdu_b + d[None, :] * sdu_d
    dB_base = dB_ptr + b * sdB_b + k * sdB_k + pid_d * sdB_blk + offs_n[None, :] * sdB_n
    dC_base = dC_ptr + b * sdB_b + k * sdB_k + pid_d * sdB_blk + offs_n[None, :] * sdB_n
    return (d, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, gy_base, du_base,
            ddt_base, B_base, C_base, dB_base, dC_base, hws_base)


@triton.jit
def _ss_bwd_kernel(
    gy_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, hws_ptr, scr_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    L, N, CG, n_saved, KC, n_batch, BLOCKS,
    sg_b, sg_d, sg_l, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
    sB_b, sB_k, sB_n, sB_l, sC_b, sC_k, sC_n, sC_l, sD, sbias,
    sdu_b, sdu_d, sdB_b, sdB_k, sdB_blk, sdB_n,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ATOMIC: tl.constexpr,
    FAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SAVE_T: tl.constexpr,
    FLIP: tl.constexpr, LANES: tl.constexpr, HAS_STATES: tl.constexpr, STAGES: tl.constexpr, EVEN: tl.constexpr,
    FLAT: tl.constexpr, ALIGN: tl.constexpr, PERSIST: tl.constexpr, HALVING: tl.constexpr = 0,
):
    """Pass 1 (unless HAS_STATES: the forward stored them) walks L forwards storing the state entering
    every SAVE_T positions; pass 2 walks chunks of
    BLOCK_T positions in reverse. SAVE_T = BLOCK_T unless LANES (tiles (T, N, D): one lane per channel
    and all its states), whose short chunks fit in registers: a forward pass from each interval's saved
    state then first writes every chunk's entry state to this program's scratch (in L2).

    PERSIST (with HAS_STATES and SAVE_T = BLOCK_T only): a one-dimensional grid whose programs each walk
    BLOCKS channel blocks in one pipelined loop over (block, chunk) pairs, as the forward's PERSIST."""
    L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n = _aligned_inputs(
        L, su_b, su_d, sdt_b, sdt_d, sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, ALIGN)
    sg_b, sg_d = _aligned(sg_b, ALIGN), _aligned(sg_d, ALIGN)
    sdu_b, sdu_d = _aligned(sdu_b, ALIGN), _aligned(sdu_d, ALIGN)
    sdB_b, sdB_k = _aligned(sdB_b, ALIGN), _aligned(sdB_k, ALIGN)
    sdB_blk, sdB_n = _aligned(sdB_blk, ALIGN), _aligned(sdB_n, ALIGN)
    offs_t = tl.arange(0, BLOCK_T)
    SUB: tl.constexpr = SAVE_T // BLOCK_T
    interval_stride = KC * BLOCK_N
    first = _time_column(offs_t == 0, FLAT)
    last = _time_column(offs_t == BLOCK_T - 1, FLAT)
    tl.static_assert(not PERSIST or (HAS_STATES and SUB == 1), "PERSIST needs saved states, one chunk each")

    if PERSIST:
        g = _state_zeros(BLOCK_D, BLOCK_N, LANES, FLAT)
        dA_acc = tl.zeros_like(g)
        dD_acc = tl.zeros((BLOCK_D,), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
        for it in tl.range(0, BLOCKS * n_saved, num_stages=STAGES):
            step, pid_d, k, b = _walked_block(it, n_saved, CG, KC // CG, n_batch, BLOCK_D)
            c = n_saved - 1 - step  # chunks in reverse within a block
            (d, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, gy_base, du_base,
             ddt_base, B_base, C_base, dB_base, dC_base, hws_base) = _bwd_block(
                pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, gy_ptr, du_ptr, ddt_ptr,
                B_ptr, C_ptr, dB_ptr, dC_ptr, hws_ptr, sg_b, sg_d, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n,
                sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias, sdu_b, sdu_d, sdB_b, sdB_k, sdB_blk, sdB_n,
                HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
            fresh = c == n_saved - 1
            g = tl.where(fresh, 0.0, g)
            dA_acc = tl.where(fresh, 0.0, dA_acc)
            dD_acc = tl.where(fresh, 0.0, dD_acc)
            dbias_acc = tl.where(fresh, 0.0, dbias_acc)
            h = tl.load(hws_base + c * interval_stride, mask=state_mask, other=0.0)
            t = c * BLOCK_T + offs_t
            u, raw, gy, Bt, Ct = _ss_bwd_loads(t, L, u_base, dt_base, gy_base, B_base, C_base, mask_d, mask_n,
                                               su_l, sdt_l, sg_l, sB_l, sC_l, EVEN)
            g, dA_p, dD_p, dbias_p, dBp, dCp = _ss_bwd_chunk(
                t, u, raw, gy, Bt, Ct, h, g, L, dt_base, du_base, ddt_base, mask_d, sdt_l, A, A * 1.4426950408889634,
                bias, dskip, first, last, HAS_D, HAS_BIAS, SOFTPLUS, FAST, FLIP, LANES, EVEN, FLAT)
            _store_dBC(dB_base, dC_base, t, L, mask_n, dBp, dCp, ATOMIC, EVEN)
            dA_acc += dA_p
            dD_acc += dD_p
            dbias_acc += dbias_p
            done = c == 0  # the block's last chunk: its per-batch partials are complete
            _store_channel_partials(dA_ptr, dD_ptr, dbias_ptr, b, KC, N, rows, states, d, dA_acc, dD_acc, dbias_acc,
                                    state_mask & done, mask_d & done, HAS_D, HAS_BIAS)
    else:
        pid_d = tl.program_id(0)
        k = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        (d, mask_d, mask_n, rows, states, state_mask, A, bias, dskip, u_base, dt_base, gy_base, du_base,
         ddt_base, B_base, C_base, dB_base, dC_base, hws_base) = _bwd_block(
            pid_d, k, b, CG, N, KC, n_saved, A_ptr, D_ptr, bias_ptr, u_ptr, dt_ptr, gy_ptr, du_ptr, ddt_ptr,
            B_ptr, C_ptr, dB_ptr, dC_ptr, hws_ptr, sg_b, sg_d, su_b, su_d, sdt_b, sdt_d, sA_d, sA_n,
            sB_b, sB_k, sB_n, sC_b, sC_k, sC_n, sD, sbias, sdu_b, sdu_d, sdB_b, sdB_k, sdB_blk, sdB_n,
            HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, LANES, EVEN, FLAT)
        A2 = A * 1.4426950408889634
        program = (b * tl.num_programs(1) + k) * tl.num_programs(0) + pid_d
        tile = BLOCK_N * BLOCK_D
        channel = rows - (k * CG + pid_d * BLOCK_D)  # within the block
        if LANES:
            scr_base = scr_ptr + program * (SUB * tile) + states * BLOCK_D + channel
        else:
            scr_base = scr_ptr + program * (SUB * tile) + channel * BLOCK_N + states

        if not HAS_STATES:  # pass 1: forwards along L, storing the state entering each interval
            h = tl.zeros(state_mask.shape, tl.float32)
            for c in range(0, n_saved):
                tl.store(hws_base + c * interval_stride, h, mask=state_mask)
                for j in range(0, SUB):
                    h = _ss_state_after(h, (c * SUB + j) * BLOCK_T + offs_t, L, u_base, dt_base, B_base, mask_d,
                                        mask_n, su_l, sdt_l, sB_l, bias, A2, first, last, HAS_BIAS, SOFTPLUS, FAST,
                                        LANES, EVEN, FLAT)
            tl.debug_barrier()

        # Pass 2: chunks in reverse, the adjoint's carry in registers (g_t = C_t gy_t + a_{t+1} g_{t+1}).
        g = tl.zeros(state_mask.shape, tl.float32)
        dA_acc = tl.zeros(state_mask.shape, tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
        # STAGES > 1: Triton's pipeliner issues later intervals' loads during the current one (as the forward)
        for i in tl.range(0, n_saved, num_stages=STAGES):
            c = n_saved - 1 - i
            h = tl.load(hws_base + c * interval_stride, mask=state_mask, other=0.0)
            if SUB > 1:
                tl.store(scr_base, h)
                for j in range(0, SUB - 1):  # entry states of the interval's later chunks
                    h = _ss_state_after(h, (c * SUB + j) * BLOCK_T + offs_t, L, u_base, dt_base, B_base, mask_d,
                                        mask_n, su_l, sdt_l, sB_l, bias, A2, first, last, HAS_BIAS, SOFTPLUS,
                                        FAST, LANES, EVEN, FLAT)
                    tl.store(scr_base + (j + 1) * tile, h)
                tl.debug_barrier()  # the scratch is read by other threads than wrote it
            for jj in range(0, SUB):
                j = SUB - 1 - jj
                t = (c * SUB + j) * BLOCK_T + offs_t
                if SUB > 1:
                    h = tl.load(scr_base + j * tile)
                u, raw, gy, Bt, Ct = _ss_bwd_loads(t, L, u_base, dt_base, gy_base, B_base, C_base, mask_d, mask_n,
                                                   su_l, sdt_l, sg_l, sB_l, sC_l, EVEN)
                g, dA_p, dD_p, dbias_p, dBp, dCp = _ss_bwd_chunk(
                    t, u, raw, gy, Bt, Ct, h, g, L, dt_base, du_base, ddt_base, mask_d, sdt_l, A, A2, bias, dskip,
                    first, last, HAS_D, HAS_BIAS, SOFTPLUS, FAST, FLIP, LANES, EVEN, FLAT, HALVING)
                if HALVING:
                    _store_halved_dBC(dB_ptr, dC_ptr, b * sdB_b + k * sdB_k + pid_d * sdB_blk, t, L, dBp, N,
                                      BLOCK_N, sdB_n, ATOMIC, EVEN, BLOCK_D)
                else:
                    _store_dBC(dB_base, dC_base, t, L, mask_n, dBp, dCp, ATOMIC, EVEN)
                dA_acc += dA_p
                if HAS_D:
                    dD_acc += dD_p
                if HAS_BIAS:
                    dbias_acc += dbias_p
            if SUB > 1:
                tl.debug_barrier()  # before the next interval overwrites the scratch

        _store_channel_partials(dA_ptr, dD_ptr, dbias_ptr, b, KC, N, rows, states, d, dA_acc, dD_acc, dbias_acc,
                                state_mask, mask_d, HAS_D, HAS_BIAS)


def halving(cfg: dict, u: torch.Tensor) -> int:
    """The HALVING constant of the d_state-16 backwards (configuration key HALVING): dB / dC summed over
    the channel lanes by :func:`_halving_sums`, which needs LANES tiles of one warp: 32 channels and
    2 N <= 32, or 16 channels and N = 16 (two lanes a channel); 2 with shuffles (compiled CUDA), 1 with the
    interpreter's stand-in; 0 otherwise."""
    lanes_fit = ((cfg["BLOCK_D"] == 32 and cfg["BLOCK_N"] <= 16) or (cfg["BLOCK_D"] == 16 and cfg["BLOCK_N"] == 16))
    if not (cfg.get("HALVING") and cfg.get("LANES") and cfg["num_warps"] == 1 and lanes_fit):
        return 0
    return 2 if u.device.type == "cuda" else 1


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` costs about 2 µs a call through its wrapper)."""
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def default_config(channels_per_group: int, state: int, backward: bool = False, length: int | None = None,
                   elem_size: int = 4, saving: bool = False) -> dict:
    """Block sizes: a thread per (channel, state) pair, or with LANES per channel; BLOCK_T steps in registers.

    Picked from H200 sweeps (benchmarks/gpu_scan.py, BENCHMARKS.md): forward with one warp of 32
    channels for d_state 1-2, for long sequences in 64-step chunks with Triton's pipeliner keeping three
    chunks' loads in flight (STAGES 3; VMamba-T stage 1: session 9, 32-step chunks, fp32 0.543 ms against
    0.684 with the hand-written one-chunk PREFETCH, bf16 0.475 against 0.513; session 10, 64-step chunks
    fp32 0.503 against 0.554, bf16 0.436 against 0.484); for d_state 3-16
    LANES tiles (one channel and all its states per lane; one warp, 8-step chunks, PREFETCH: 2.5x the
    (channel, state)-per-lane forward at vanilla-T stage 1, 1.9x at stage 3, session 6), 128 threads
    above; backward with 32 threads for d_state 1-2 and the adjoint as a forward scan of the flipped chunk
    (FLIP; session 10, stage 1: fp32 2.290 against 2.431 ms, bf16 1.670 against 1.801) and, for 2-byte
    inputs, du / ddelta stored in their dtype in 16-step chunks (HALF_GRADS, no cast pass afterwards; bf16
    forward + backward through the op, stages 1-3: 1.853 / 1.396 / 1.099 ms against 2.273 / 1.638 / 1.511
    with 8-step chunks and float32 gradients cast afterwards); at d_state 1 from L 512 with 16 channels
    per warp as (T, D) tiles (FLAT; in 32-step chunks from L 2048; session 12, below), LANES tiles in
    4-position chunks with the flipped adjoint scan for d_state 3-16 (2.7x faster fp32, 3.1x bf16 at
    vanilla-T stage 1), else 128 threads. Short sequences at d_state 1 (below L 512; session 13): rows of
    4k elements (L 196) walk several channel blocks per program through the pipeliner in the forward
    (PERSIST) and pipeline the bf16 backward; rows not aligned to 4 elements (L 49) take 16 channels per
    warp in the bf16 backward and the float32 forward. Rows of 33-256 steps at d_state 1 (session 14): the
    backward takes whole rows in one chunk and so keeps no states (session 18: with consecutive steps in
    each lane, STEPS), and the forward does too from 129 steps where rows are 4-aligned. Rows of up to 256
    steps at d_state 1 (session 15): the forward packs whole rows end to end, one 16-byte vector a thread
    (PACKED rows a program, VECTOR elements a thread; :mod:`.selective_scan_packed`; B and C read in
    aligned pieces where L and their rows allow, ALIGN_BC: float32 since session 16, bf16 since 21). The d_state 3-16
    backward sums dB / dC over its channel lanes by recursive halving (HALVING, session 17); at d_state
    3-8 it takes 2-position chunks up to L 256 (session 16), at d_state 9-16 16 channels a warp in
    4-position chunks at every length (sessions 19-20).
    BLOCK_D divides the group's channels where a power of two does, so no lane idles. ``saving``: a
    forward that also keeps the backward's states; at d_state 9-16 its LANES tiles then take 16 channels
    a warp (session 19, vanilla-T bf16 forward keeping states, kernel alone: stage 1 2.32 ms against
    3.07 with 32, stage 3 0.669 against 1.279), and so do those of the forward that keeps none below
    L 512, capped at 168 registers (session 20).
    """
    return dict(_default_config(channels_per_group, state, backward, length, elem_size, saving))


@functools.lru_cache(maxsize=1024)
def _default_config(channels_per_group: int, state: int, backward: bool, length: int | None,
                    elem_size: int, saving: bool = False) -> dict:
    """:func:`default_config`, cached (its callers take copies): it runs on every call of the op."""
    block_n = _next_pow2(state)
    long_seq = length is None or length >= 512
    if backward:
        threads = 32 if block_n <= 2 else 128
    else:
        threads = 32 if block_n <= 2 else (256 if block_n <= 16 else 128)
    max_d = max(1, threads // block_n)
    block_d = min(max_d, _next_pow2(channels_per_group))
    cand = block_d
    while cand > 1 and channels_per_group % cand:
        cand //= 2
    if cand * block_n >= 32 or cand * 2 >= block_d:
        block_d = cand
    num_warps = max(1, min(8, block_d * block_n // 32))
    stages = 1
    if backward and 4 <= block_n <= 16:
        # LANES: 4-position chunks inside 16-position state intervals; 2-position ones for rows of up to 256
        # (session 16, vanilla-T bf16: stage 3 6.47 ms against 7.76, stage 4 3.81 against 4.56; stage 1
        # 22.9 against 22.1 and stage 2 10.7 against 10.2 stay at 4). HALVING: dB / dC summed over the
        # lanes by recursive halving (session 17, bf16 with saved states: stage 1 18.2 ms against 22.1, stage
        # 2 8.70 against 10.21, stage 3 5.48 against 6.46; float32 stage 1 17.3 against 21.1; 2-step chunks
        # still lost at stages 1-2, 20.1 and 9.84 ms)
        block_t, block_d = (2 if length is not None and length <= 256 else 4), 32
        if block_n == 16:
            # d_state 9-16: 16 channels a warp, each channel's states on two lanes, halving over the 16 channel
            # lanes, in 4-position chunks at every length (vanilla-T bf16 with saved states, same run: session
            # 19, stage 1 14.65 ms against 17.54; session 20, stage 2 7.08 against 8.32, stage 3 4.42 against
            # 5.41 and stage 4 2.44 against 3.00 for 32 channels in 2-position chunks; 16 channels in
            # 2-position chunks: stage 3 5.99, stage 4 3.03)
            block_t, block_d = 4, 16
        return {"BLOCK_D": block_d, "BLOCK_N": block_n, "BLOCK_T": block_t, "num_warps": 1, "PREFETCH": 0,
                "LANES": 1, "FLIP": 1, "HALVING": 1}
    flip = half_grads = flat = 0
    if backward and block_n <= 2:
        # 2-byte inputs: du / ddelta stored in their dtype, in 16-step chunks (whole 32-byte sectors
        # per channel row; 8-step chunks' half-sector stores were slower at every stage, session 10)
        half_grads = int(elem_size == 2)
        block_t, flip = 16 if half_grads else 8, 1
        # d_state 1 only (where measured), from L 512: 16 channels per warp as (T, D) tiles (FLAT), two
        # lanes per channel ((T, D, N) tiles got a layout that interleaves the steps of both lanes), in
        # 32-step chunks from L 2048 and 16-step ones below. Session 12, forward + backward through the op
        # as CUDA-graph replays: float32 stage 1 1.700 against 1.798 ms and stage 2 0.965 against 1.015
        # for the session-11 default ((T, D, N), 16 channels, 32-step); bf16 stage 1 1.393 against 1.453
        # for FLAT in 16-step chunks, stage 2 0.650 against 0.764 for the session-11 default ((T, D, N),
        # 32 channels); at stage 1 FLAT in 16-step chunks had beaten that default's (T, D, N) 16 channels,
        # 1.443 against 1.577 ms (do_bench through the op). Shorter sequences keep (T, D, N) tiles (stage
        # 3: bf16 0.959 against 1.051 ms for FLAT).
        if block_n == 1 and long_seq:
            block_d, flat = min(block_d, 16), 1
            block_t = 32 if length is None or length >= 2048 else 16
            # float32: the pipeliner keeps later chunks' loads in flight (session 13, kernels as CUDA-graph
            # replays: stage 1 0.968 ms with 3 stages, 1.088 with 2 and 1.202 with 1; stage 2 0.641, 0.648
            # and 0.666; bf16 lost, 1.645 ms with 2 against 0.943 at stage 1)
            stages = 1 if half_grads else 3
    elif backward:
        block_t = 8
    elif block_n <= 2:
        block_t, stages = (64, 3) if long_seq else (16, 1)
    elif block_n <= 16:  # one channel and all its states per lane (LANES)
        cfg = {"BLOCK_D": 32, "BLOCK_N": block_n, "BLOCK_T": 8, "num_warps": 1, "PREFETCH": 1, "LANES": 1}
        if block_n == 16 and saving:
            cfg["BLOCK_D"] = 16
        elif block_n == 16 and not long_seq:
            # d_state 9-16 below L 512, not keeping states: 16 channels, capped at 168 registers (session 20,
            # vanilla-T bf16, same run: stage 3 0.639 ms against 0.715 for 32 channels, 0.689 uncapped; stage 4
            # 0.334 against 0.361; stages 1-2 lost, 2.16 against 2.01 and 1.04 against 1.01)
            cfg.update(BLOCK_D=16, maxnreg=168)
        return cfg
    else:
        block_t = 8
    # Bounds masks dropped where a launch covers whole chunks (d_state 1, where measured; session 11, stage
    # 1: fp32 forward 0.490 against 0.504 ms, bf16 backward 1.614 against 1.630 through the op), except the
    # 2-byte forward, which then spills (48 bytes offline) and lost (0.440 against 0.434 ms)
    even = int(block_n == 1 and (backward or elem_size != 2))
    # Rows aligned to fewer than 16 elements (L = 196) declared to the compiler, so that it uses 8- or
    # 16-byte vectors instead of single elements: the bf16 backward and the fp32 forward, at d_state 1
    # (session 12, stage 3, with it in call 10 and without it in call 7, not interleaved: bf16 forward +
    # backward with saved states 0.714 against 0.970 ms, fp32 forward 0.229 against 0.239 ms; the bf16
    # forward and the fp32 backward, whose layouts change with the vector width, lost: 0.232 against
    # 0.209 ms, and 0.714 against 0.649 ms as forward + backward minus forward)
    row_align = int(block_n == 1 and backward == (elem_size == 2))
    persist = row_blocks = maxnreg = steps = 0
    if block_n == 1 and not long_seq and length % 4 == 0:
        # Rows of 4k elements below L 512 (L = 196: stage 3) at d_state 1, where declared alignment lets the
        # pipeliner copy them asynchronously (8-byte pieces in bf16): the forward as 8 programs per SM, each
        # walking several channel blocks in 32-step chunks through the pipeliner (PERSIST), and the bf16
        # backward through the pipeliner. Session 13, stage 3, kernels as CUDA-graph replays against the
        # previous defaults (16-step chunks, no pipeliner): forward bf16 0.140 against 0.203 ms (inference)
        # and 0.156 against 0.208 (keeping states), float32 0.176 against 0.225 and 0.190 against 0.232;
        # bf16 backward 0.427 against 0.495. The float32 backward keeps its default: PERSIST gained 3 %
        # (0.598 against 0.619 ms) but needs saved states, and its fallback lost (0.680). At L 49 (odd) the
        # forward lost: bf16 0.113 against 0.093 ms, float32 0.278 against 0.113.
        if not backward:
            block_t, stages, persist, row_align = 32, 3, 8, 1
        elif half_grads:
            stages = 3
    elif block_n == 1 and not long_seq and (backward == (elem_size == 2)) and block_d == 32:
        # Rows not aligned to 4 elements (L = 49: stage 4), the bf16 backward and the float32 forward: 16
        # channels per warp (session 13, kernels as CUDA-graph replays: bf16 backward 0.337 against 0.393
        # ms, float32 forward 0.099 against 0.115; the bf16 forward and float32 backward lost, 0.100 against
        # 0.093 and 0.399 against 0.381). The float32 forward capped at 128 registers (session 14): 0.0899
        # against 0.1004 ms; capped bf16 forwards lost (0.161 ms at 128 against 0.0925)
        block_d = 16
        maxnreg = 0 if backward else 128
    if block_n == 1 and length is not None and (32 < length <= 256 if backward else
                                                 (128 < length <= 256 and length % 4 == 0)):
        # Whole rows in one chunk; the backward then keeps no states, so the training forward is the
        # inference forward. Session 14 (its backward, (T, D) tiles with time across the lanes, is replaced
        # below and deleted since; the figures are the history), kernels as
        # CUDA-graph replays against the session-13 defaults: L 196 (stage 3) forward bf16 0.1225 against
        # 0.139 ms (2 channels, 1 warp), float32 0.1435-0.152 against 0.179 (2 channels, 2 warps); backward
        # with 16 blocks of one channel per program (ROW_BLOCKS) bf16 0.366 against 0.427 (and the forward's
        # states), float32 0.374 against 0.580. L 49 (stage 4) backward, 2 channels a program: bf16 0.258
        # against 0.328, float32 0.264 against 0.377; its forward lost at every width tried (bf16 0.117 at
        # best against 0.0925). More channels per program lost in both directions (4-32 channels: up to 5x
        # slower), so did 16 blocks of 2 channels per program at L 49 (0.294 ms) and the flipped adjoint.
        # The L-196 backward capped at 128 registers (225 uncapped, offline): bf16 0.347 against 0.366 ms,
        # float32 0.369 against 0.374; then 32 blocks a program through the pipeliner (2 stages): bf16
        # 0.319 against 0.353, float32 0.342 against 0.375 (r = 16, 2 stages: 0.322 / 0.347). Forwards
        # walking several blocks through the pipeliner (PERSIST 16-32) lost: float32 0.172 against 0.143.
        block_t, flat, flip, stages, persist, row_align = _next_pow2(length), 1, 0, 1, 0, 1
        if backward:
            # Session 18: lanes of consecutive steps (STEPS, selective_scan_rows) replaced the session-14
            # kernel (L 49 with 2 channels a program, L 196 with 32 one-channel blocks through the pipeliner,
            # capped at 128 registers). Kernels as CUDA-graph replays in one run each:
            # - up to 64 steps (L 49: stage 4): 8 lanes of 8 steps a channel, 4 channels a warp, 16 blocks a
            #   program, capped at 128: bf16 0.166 ms against 0.256, float32 0.180 against 0.263 (8 blocks:
            #   0.171 / 0.185; caps of 112 / 96: 0.185 / 0.228 bf16; 16 lanes of 4 steps, 16 blocks, cap 80:
            #   0.177 / 0.196). Rows aligned to the steps move as vectors (ROW_ALIGN): at L 64 (stage 4 at
            #   256²) bf16 0.133 ms against 0.174 one step at a time and 0.213 for the session-14 kernel,
            #   float32 0.208 against 0.219 and 0.229.
            # - above (L 196: stage 3): lanes of 4 steps (64 lanes a channel, two a thread, loaded as
            #   vectors), 32 blocks through the pipeliner, capped at 128: bf16 0.282 ms against 0.318, float32
            #   0.279 against 0.342 (uncapped 0.317 / 0.316, one stage 0.347 / 0.360, 2 steps a lane 0.378 /
            #   0.385, two warps a channel 0.374 / 0.373, 8 steps a lane one at a time 0.408 / 0.454). Session
            #   21: 3 pipeline stages, bf16 0.2608 ms against 0.2826 for 2, float32 0.2619 against 0.2804 (at
            #   L 49, 2 stages lost: bf16 0.1857 against 0.1683 for 1, float32 0.1964 against 0.1828).
            num_warps, maxnreg = 1, 128
            block_d, row_blocks, steps, stages = (4, 16, 8, 1) if block_t <= 64 else (1, 32, 4, 3)
        else:
            block_d, num_warps = 2, 1 if elem_size == 2 else 2
    cfg = {"BLOCK_D": block_d, "BLOCK_N": block_n, "BLOCK_T": block_t, "num_warps": num_warps, "PREFETCH": 0,
           "STAGES": stages, "FLIP": flip, "HALF_GRADS": half_grads, "EVEN": even, "FLAT": flat,
           "ROW_ALIGN": row_align, "PERSIST": persist, "ROW_BLOCKS": row_blocks}
    if steps:
        cfg["STEPS"] = steps
    if not backward and block_n == 1 and length is not None and length <= 256:
        # Rows packed end to end, one 16-byte vector a thread (selective_scan_packed): tiles of 512 elements
        # up to L 64, else of 256 threads, holding as many whole rows as fit (with the up to V - 1 elements
        # before them where the block does not start on a vector boundary). Session 15, kernels as
        # CUDA-graph replays, call 7 against the session-14 defaults (calls 4 and 7): L 49 (stage 4) bf16
        # 0.0625 ms against 0.0938 (10 rows; 40 rows in a 2048-element tile 0.0668, 5 rows 0.0633), float32
        # 0.0733 against 0.0911 (10 rows; 20 rows 0.0773); L 196 (stage 3) bf16 0.1056 against 0.1245
        # (10 rows; 5 rows 0.1076), float32 0.1349 against 0.1434 (5 rows; 2 rows 0.1500). One row a
        # program, 16 warps, two vectors a thread and 8-byte vectors in bf16 lost (up to 3.8x slower).
        from .selective_scan_packed import rows_per_tile  # imported here: it imports this module

        vector = 16 // elem_size
        rows = rows_per_tile(length, vector, 512 if length <= 64 else 256 * vector)
        if rows and vector <= length:
            # ALIGN_BC: B and C in aligned pieces where L and their rows allow (session 16, L 196 float32
            # 0.1218 ms against 0.1294; bf16 then lost, 0.1158 against 0.1050). Session 21, with B and C
            # loaded unmasked: bf16 too, L 196 0.1042-0.1049 ms against 0.1061 without it and 0.1052-0.1053
            # for session 20's kernel (L 49 is not aligned: unchanged)
            cfg.update(PACKED=rows, VECTOR=vector, ALIGN_BC=1)
    if not backward:
        # the chunked forward keeps the series softplus for 2-byte inputs (SHORT_SOFTPLUS 0; the packed one
        # takes the short form): the short one gained nothing at stage 2 and lost at stage 1 (VMamba-T[s1l8]
        # bf16, session 22: 0.4257 against 0.4149 ms)
        cfg["SHORT_SOFTPLUS"] = 0
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return cfg


def _check(u, delta, A, B, C):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if t.dtype == torch.float64:
            raise TypeError(f"the triton selective scan does not take float64 inputs ({name})")
    batch, channels, length = delta.shape
    groups = B.shape[1]
    if channels % groups:
        raise ValueError("channels must split evenly into the groups of B and C")
    cg = channels // groups
    if tuple(u.shape) != tuple(delta.shape):
        raise ValueError(f"u shape {tuple(u.shape)} != delta shape {tuple(delta.shape)}")
    return batch, channels, length, groups, cg, A.shape[1]


def fast_math(t: torch.Tensor, short_softplus: bool = True) -> int:
    """The kernels' FAST constant for inputs like ``t``, two flags: 1, hardware approximations (inline PTX;
    compiled CUDA only, not the interpreter); 2, 2-byte inputs, whose softplus needs no small-argument
    series (:func:`_softplus_and_slope`), unless ``short_softplus`` is false (configuration key
    SHORT_SOFTPLUS 0, where the short form was measured to lose)."""
    return (t.device.type == "cuda") + 2 * (short_softplus and t.element_size() == 2)


# the keys that decide a kernel's tile, and so what register cap suits it
_TILE_KEYS = ("BLOCK_D", "BLOCK_N", "BLOCK_T", "num_warps", "LANES", "FLAT", "STEPS")


def _config(cg, state, backward, overrides, length=None, elem_size=4, defaults=None):
    """Launch configuration: ``defaults`` (else :func:`default_config`), then the
    VMAMBA_TRITON_SCAN_CONFIG environment variable, then ``overrides``. A default register cap was measured
    for the default tile: where the environment or ``overrides`` change the tile (_TILE_KEYS) without
    naming ``maxnreg``, the cap is dropped rather than applied to a tile it was not chosen for."""
    cfg = dict(defaults) if defaults is not None else default_config(cg, state, backward, length, elem_size)
    given = {}
    env = os.environ.get("VMAMBA_TRITON_SCAN_CONFIG")
    if env:  # e.g. "BLOCK_D=32,BLOCK_T=64,num_warps=8" (benchmark sweeps)
        for item in env.split(","):
            key, value = item.split("=")
            given[key.strip()] = int(value)
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "maxnreg" not in given and any(k in given and given[k] != cfg.get(k) for k in _TILE_KEYS):
        cfg.pop("maxnreg", None)
    cfg.update(given)
    return cfg


def _even(cfg: dict, channels_per_group: int, state: int, length: int, interval: int) -> bool:
    """Whether a launch covers whole chunks, intervals, channel blocks and state blocks, so the kernels may
    drop their bounds masks
    (configuration key EVEN, set by :func:`default_config` where measured). Not with LANES or PREFETCH,
    which read past the last chunk or interval."""
    return bool(cfg.get("EVEN", 0) and not cfg.get("LANES", 0) and not cfg.get("PREFETCH", 0)
                and length % cfg["BLOCK_T"] == 0 and length % interval == 0
                and channels_per_group % cfg["BLOCK_D"] == 0 and state == cfg["BLOCK_N"])


def _flat(cfg: dict) -> bool:
    """Whether the kernels hold their tiles as (T, D) instead of (T, D, N) (configuration key FLAT; one
    state, not LANES). The tiles then take the layout of their loads, instead of a 3-D layout that
    Triton picks for them and converts to and from."""
    return bool(cfg.get("FLAT", 0) and cfg["BLOCK_N"] == 1 and not cfg.get("LANES", 0))


def common_alignment(sizes) -> int:
    """The largest power of two up to 16 that divides every size (a length or a stride, in elements)."""
    align = 16
    while align > 1 and any(size % align for size in sizes):
        align //= 2
    return align


def _row_alignment(cfg: dict, strides) -> int:
    """With the configuration key ROW_ALIGN, the largest power of two below 16 that divides the length
    and every stride (elements), for :func:`_aligned`; else, and where 16 divides them all (which
    Triton's launcher specialises by itself), 1."""
    if not cfg.get("ROW_ALIGN", 0):
        return 1
    align = common_alignment(strides)
    return 1 if align == 16 else align


def launch_options(cfg) -> dict:
    """Triton launch options of a configuration (this module's kernels and the fused core's): num_warps,
    and the register cap per thread ``maxnreg`` where set. Capped at 128: the core's d_state-1 and
    d_state-16 backwards and its d_state-16 forward without saved states, the plain scan's whole-row
    backward above 64 steps and its float32 forward at L 49; at 168: the plain d_state-16 forward without
    saved states below L 512. The other defaults are not capped (caps that fit stage 1 in one wave
    spilled and lost, session 11)."""
    options = {"num_warps": cfg["num_warps"]}
    if cfg.get("maxnreg"):
        options["maxnreg"] = int(cfg["maxnreg"])
    return options


def _lanes_a_channel(cfg: dict) -> int:
    """Lanes a channel's row spreads over in the STEPS backward, BLOCK_T positions in STEPS a lane: with
    more than the warps have for BLOCK_D channels, a thread holds several of them."""
    return max(1, cfg["BLOCK_T"] // int(cfg["STEPS"]))


def _steps_apply(cfg: dict, state: int, length: int) -> bool:
    """Whether the backward of configuration ``cfg`` is :mod:`.selective_scan_rows`' (key STEPS)."""
    if not cfg.get("STEPS", 0):
        return False
    from .selective_scan_rows import rows_bwd_applies  # imported here: it imports this module

    return rows_bwd_applies(state, length, _lanes_a_channel(cfg), int(cfg["STEPS"]))


def _state_interval(cfg) -> int:
    """Positions between the states a backward of configuration ``cfg`` keeps: its chunk length, or
    LANES_SAVE_INTERVAL for LANES, whose shorter chunks fit inside an interval."""
    return LANES_SAVE_INTERVAL if cfg.get("LANES", 0) else cfg["BLOCK_T"]


def _backward_interval(u, A, B, config=None) -> tuple[int, int]:
    """(positions between the states the backward keeps, BLOCK_N) of its (default, or ``config``)
    configuration; 0 positions where it keeps none (whole rows, :mod:`.selective_scan_rows`)."""
    channels, length = u.shape[1], u.shape[2]
    cfg = _config(channels // B.shape[1], A.shape[1], True, config, length, u.element_size())
    return 0 if _steps_apply(cfg, A.shape[1], length) else _state_interval(cfg), cfg["BLOCK_N"]


def saved_states_shape(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, config=None) -> tuple[int, ...]:
    """Shape of the float32 states :func:`selective_scan_bwd` keeps, (batch, intervals, KC, BLOCK_N): the
    state entering every interval of its (default, or ``config``) configuration; no intervals where that
    backward takes whole rows."""
    interval, block_n = _backward_interval(u, A, B, config)
    return u.shape[0], 0 if interval == 0 else cdiv(u.shape[2], interval), u.shape[1], block_n


def check_states(states: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Saved states must be contiguous float32 of the ``expected`` shape."""
    if tuple(states.shape) != expected or states.dtype != torch.float32 or not states.is_contiguous():
        raise ValueError(f"states must be contiguous float32 {expected}, got {tuple(states.shape)} {states.dtype}")


def selective_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, config=None,
                       states_out=None):
    """Forward selective scan; returns y (batch, KC, L) float32. See the module docstring.

    ``states_out`` (float32, :func:`saved_states_shape`): the forward also stores there the states the
    backward keeps, so that :func:`selective_scan_bwd` given them skips its first pass (the custom op
    does this at the d_states of ``vmamba.ops.selective_scan.SAVE_STATES_AT``: 1, 2 and 16; BENCHMARKS.md,
    sessions 8 and 19). Such a forward takes ``default_config(..., saving=True)``.
    """
    batch, channels, length, groups, cg, state = _check(u, delta, A, B, C)
    cfg = _config(cg, state, False, config, length, u.element_size(),
                  defaults=default_config(cg, state, False, length, u.element_size(), saving=states_out is not None))
    y = torch.empty(batch, channels, length, device=u.device, dtype=torch.float32)
    if y.numel() == 0:
        return y
    save_t = n_saved = 0
    if states_out is not None:
        save_t, block_n = _backward_interval(u, A, B)
        n_saved = 0 if save_t == 0 else cdiv(length, save_t)
        check_states(states_out, (batch, n_saved, channels, block_n))
    if cfg.get("PACKED", 0) and not n_saved:
        # imported here, not at the top: that module takes its jit helpers from this one
        from .selective_scan_packed import packed_fwd, packed_fwd_applies

        rows, vector = int(cfg["PACKED"]), int(cfg.get("VECTOR", 4))
        if packed_fwd_applies(state, length, rows, vector):
            return packed_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, rows, vector, out=y,
                              align_bc=bool(cfg.get("ALIGN_BC", 0)))
    if n_saved and cfg["BLOCK_T"] % save_t and save_t % cfg["BLOCK_T"]:  # neither chunk length fits the other's
        cfg["BLOCK_T"] = save_t
    dummy = y
    Dt = D if D is not None else dummy
    bt = delta_bias if delta_bias is not None else dummy
    grid, blocks = _grid(cfg, cg, groups, batch, u.device)
    _ss_fwd_kernel[grid](
        u, delta, A, B, C, Dt, bt, y, states_out if states_out is not None else y,
        length, state, cg, n_saved, groups, batch, blocks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        Dt.stride(0), bt.stride(0), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        FAST=fast_math(u, short_softplus=bool(cfg.get("SHORT_SOFTPLUS", 1))),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"],
        PREFETCH=bool(cfg.get("PREFETCH", 0)), LANES=bool(cfg.get("LANES", 0)), SAVE_T=save_t,
        STAGES=int(cfg.get("STAGES", 1)), EVEN=_even(cfg, cg, state, length, cfg["BLOCK_T"]), FLAT=_flat(cfg),
        ALIGN=_row_alignment(cfg, (length,) + u.stride()[:2] + delta.stride()[:2] + B.stride()[:3]
                             + C.stride()[:3] + y.stride()[:2]),
        PERSIST=len(grid) == 1, **launch_options(cfg),
    )
    return y


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(cfg: dict, channels_per_group: int, groups: int, batch: int,
          device: torch.device) -> tuple[tuple[int, ...], int]:
    """(grid, channel blocks per program) of either kernel. With the configuration key PERSIST = p (not
    with PREFETCH): at most p programs per multiprocessor, each walking several channel blocks in one
    pipelined loop; else a program per (channel block, group, batch element)."""
    n_blk_d = cdiv(channels_per_group, cfg["BLOCK_D"])
    persist = int(cfg.get("PERSIST", 0))
    if not persist or cfg.get("PREFETCH", 0):
        return (n_blk_d, groups, batch), 1
    n_blocks = n_blk_d * groups * batch
    blocks = cdiv(n_blocks, min(n_blocks, _multiprocessors(device) * persist))
    return (cdiv(n_blocks, blocks),), blocks


def _grad_dtype(x: torch.Tensor, cfg: dict) -> torch.dtype:
    """float32, or x's half precision with HALF_GRADS (the kernel's stores convert)."""
    half = cfg.get("HALF_GRADS", 0) and x.dtype in (torch.float16, torch.bfloat16)
    return x.dtype if half else torch.float32


def selective_scan_bwd(grad_out, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                       deterministic=None, config=None, states=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias), float32; dD / ddelta_bias None if absent.

    With the configuration key ``HALF_GRADS`` (the d_state <= 2 default for 2-byte inputs) du and
    ddelta are stored in the dtype of u and delta when that is float16 / bfloat16, still computed in
    float32: no separate cast pass over them.

    dB / dC partials of the channel blocks of a group go to a workspace summed afterwards, with the per-batch
    partials of dA, dD and ddelta_bias, in one launch (:mod:`.partial_sums`; deterministic);
    only when that workspace would exceed ``WORKSPACE_LIMIT_BYTES`` and ``deterministic`` is false
    (default: the ``VMAMBA_DETERMINISTIC`` environment variable or
    ``torch.are_deterministic_algorithms_enabled()``) are dB / dC reduced with atomics instead.
    ``states``: what :func:`selective_scan_fwd` stored in ``states_out``; the first pass, which
    recomputes them, is then skipped.
    """
    batch, channels, length, groups, cg, state = _check(u, delta, A, B, C)
    cfg = _config(cg, state, True, config, length, u.element_size())
    dev = u.device
    f32 = torch.float32
    if deterministic is None:
        deterministic = (os.environ.get("VMAMBA_DETERMINISTIC", "0") not in ("", "0")
                         or torch.are_deterministic_algorithms_enabled())
    if _steps_apply(cfg, state, length):
        from .selective_scan_rows import rows_bwd  # imported here: it imports this module

        if states is not None:  # whole rows keep no states: only the empty ones are the forward's
            check_states(states, (batch, 0, channels, cfg["BLOCK_N"]))
        options = {k: v for k, v in launch_options(cfg).items() if k != "num_warps"}
        return rows_bwd(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus,
                        (_grad_dtype(u, cfg), _grad_dtype(delta, cfg)), _lanes_a_channel(cfg), cfg["BLOCK_D"],
                        int(cfg["STEPS"]), max(1, int(cfg.get("ROW_BLOCKS", 1))), int(cfg.get("STAGES", 1)),
                        cfg["num_warps"], options, vectors=bool(cfg.get("ROW_ALIGN", 1)))
    lanes = bool(cfg.get("LANES", 0))
    interval = _state_interval(cfg)
    if interval % cfg["BLOCK_T"]:
        raise ValueError(f"LANES: BLOCK_T must divide the saved-state interval {interval}, got {cfg['BLOCK_T']}")
    n_blk = cdiv(cg, cfg["BLOCK_D"])
    n_saved = cdiv(length, interval)
    du = torch.empty(batch, channels, length, device=dev, dtype=_grad_dtype(u, cfg))
    ddelta = torch.empty(batch, channels, length, device=dev, dtype=_grad_dtype(delta, cfg))
    dA_part = torch.empty(1, 1, batch, channels * state, device=dev, dtype=f32)
    # dD and dbias partials stacked: one source for the sums at the end
    n_skip = (D is not None) + (delta_bias is not None)
    skip_parts = torch.empty(n_skip, 1, batch, channels, device=dev, dtype=f32)
    dD_part = skip_parts[0, 0] if D is not None else None
    dbias_part = skip_parts[-1, 0] if delta_bias is not None else None
    # Per-block partials of dB / dC are written to a workspace and summed (deterministic, and far
    # cheaper than atomics when d_state is large); atomics only when that workspace would be too big.
    ws_bytes = 2 * 4 * batch * groups * n_blk * state * length
    atomic = n_blk > 1 and not deterministic and ws_bytes > WORKSPACE_LIMIT_BYTES
    if atomic:
        dB = torch.zeros(batch, groups, state, length, device=dev, dtype=f32)
        dC = torch.zeros(batch, groups, state, length, device=dev, dtype=f32)
        dB_ws, dC_ws, blk_stride = dB, dC, 0
    else:
        bc_ws = torch.empty(2, batch * groups, n_blk, state * length, device=dev, dtype=f32)
        dB_ws, dC_ws = (ws.view(batch, groups, n_blk, state, length) for ws in bc_ws)
        blk_stride = dB_ws.stride(2)
    if length == 0 or batch == 0 or channels == 0:
        zeros = torch.zeros
        return (zeros(u.shape, device=dev), ddelta, zeros(A.shape, device=dev), zeros(B.shape, device=dev),
                zeros(C.shape, device=dev),
                None if D is None else zeros(D.shape, device=dev),
                None if delta_bias is None else zeros(delta_bias.shape, device=dev))
    has_states = states is not None and states.numel() > 0
    if has_states:
        check_states(states, (batch, n_saved, channels, cfg["BLOCK_N"]))
    sub = interval // cfg["BLOCK_T"]
    hws = states if has_states else torch.empty(batch, n_saved, channels, cfg["BLOCK_N"], device=dev, dtype=f32)
    grid, blocks = _grid(cfg if has_states and sub == 1 else {**cfg, "PERSIST": 0}, cg, groups, batch, dev)
    scratch = (torch.empty(n_blk * groups * batch, sub, cfg["BLOCK_N"], cfg["BLOCK_D"], device=dev, dtype=f32)
               if sub > 1 else hws)
    dummy = du
    Dt = D if D is not None else dummy
    bt = delta_bias if delta_bias is not None else dummy
    _ss_bwd_kernel[grid](
        grad_out, u, delta, A, B, C, Dt, bt, hws, scratch,
        du, ddelta, dA_part, dB_ws, dC_ws,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        length, state, cg, n_saved, channels, batch, blocks,
        *grad_out.stride(), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        Dt.stride(0), bt.stride(0),
        du.stride(0), du.stride(1), dB_ws.stride(0), dB_ws.stride(1), blk_stride, dB_ws.stride(-2),
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), ATOMIC=atomic,
        FAST=fast_math(u), BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"], SAVE_T=interval,
        FLIP=bool(cfg.get("FLIP", 0)), LANES=lanes, HAS_STATES=has_states, STAGES=int(cfg.get("STAGES", 1)),
        EVEN=_even(cfg, cg, state, length, interval), FLAT=_flat(cfg),
        ALIGN=_row_alignment(cfg, (length,) + u.stride()[:2] + delta.stride()[:2] + B.stride()[:3]
                             + C.stride()[:3] + grad_out.stride()[:2] + du.stride()[:2] + dB_ws.stride()[:2]
                             + (blk_stride,) + dB_ws.stride()[-2:-1]),
        PERSIST=len(grid) == 1, HALVING=halving(cfg, u), **launch_options(cfg),
    )
    sums = iter(sum_partials(dA_part, *([skip_parts] if n_skip else []), *([] if atomic else [bc_ws])))
    dA = next(sums)[0].view(channels, state)
    skip = next(sums) if n_skip else ()
    dD = skip[0].view(channels) if D is not None else None
    dbias = skip[-1].view(channels) if delta_bias is not None else None
    dB, dC = (dB_ws, dC_ws) if atomic else (x.view(batch, groups, state, length) for x in next(sums))
    return du, ddelta, dA, dB, dC, dD, dbias

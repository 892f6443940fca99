"""Fused SS2D scan core: the K routes of a feature map scanned straight from the map, as Triton kernels.

The unfused composition materialises K copies of the map in route order (``cross_scan``), the
per-route projections and Δ in that order, K route outputs, and folds them back (``cross_merge``).
Here every tensor stays in *pixel order* with channels contiguous (a channels-last map):

* u, the activated map: (batch, L, C), read by all K routes; L = H*W.
* xp = u @ x_proj.T for all routes at once: (batch, L, K, R + 2N), holding per route the low-rank
  Δ input (R values), B (N) and C (N) of each pixel: a projection of a pixel does not depend on the
  order in which a route visits it, so one GEMM serves every route.
* Δ = dt_proj_k · xp[..., :R]: the forward computes it inside the scan kernel (R multiply-adds per
  element, nothing stored) while R is small, or reads it from the output of :func:`delta_gemm`, a
  Triton GEMM over the routes (config ``DELTA_GEMM=1``: benchmarks/gpu_ss2d_sweep.py times both);
  the backward always uses the GEMM.
* y: (K, batch, L, C) in pixel order; the merge is then a sum over K (fused into the out-norm by
  :func:`vmamba.ops.layer_norm.layer_norm_sum`).

Route k visits pixel p(t) at step t: row-major routes p = t, column-major p = (t mod H)·W + t div H;
reversed routes (k >= nseq) use L-1-t in place of t. Loads of a (steps, channels) tile are contiguous
along the channels for any route, so reversed and column routes cost the same as row routes.

The recurrences and gradient formulas are those of :mod:`vmamba.ops.triton.selective_scan`. The
backward walks each route in reverse, chunk by chunk; it needs the state entering every chunk, which
the forward saves when asked (``save_states``: (batch, chunk, K*C, N) float32) and the backward
otherwise recomputes in a first forward pass.

Register tiles are (steps, channels, states). Config ``LANES=1`` lays them out (steps, states,
channels) instead, so that one lane owns a channel and all its states: meant for d_state 16, where
the default layout spends shuffles on every sum over states. It is tested but untimed (BENCHMARKS.md,
session 5), so no default uses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials
from .selective_scan import (
    LANES_SAVE_INTERVAL,
    _adjoint_chunk,
    _adjoint_chunk_next,
    _chunk_gradients,
    _config,
    _exp2,
    _halved_lanes,
    _next_pow2,
    _per_channel,
    _per_state,
    _save_entry_state,
    _save_inner_states,
    _scan_chunk,
    _softplus,
    _softplus_and_slope,
    _state_grid,
    cdiv,
    check_states,
    default_config,
    fast_math,
    halving,
    launch_options,
)

__all__ = ["delta_gemm", "ss2d_scan_fwd", "ss2d_scan_bwd", "saved_states_shape", "NSEQ"]

# Distinct visiting orders per scan mode: route k >= nseq is route k - nseq reversed.
NSEQ = {"unidi": 1, "bidi": 1, "cross2d": 2}


@triton.jit
def _pixel(t, L, H, W, inv_h, rev, cols, WIDE: tl.constexpr):
    """Pixel visited at route step t. tt // H in float32 (a multiply, not an integer division) is exact
    while L < 2**22 (the host checks): its error, below L * 2**-23 / H, stays under the 0.5 / H gap
    between (tt + 0.5) / H and the next integer. Offsets are int64 only where they may pass 2**31."""
    tt = tl.where(rev, L - 1 - t, t)
    q = ((tt.to(tl.float32) + 0.5) * inv_h).to(tl.int32)
    p = tl.where(cols, (tt - q * H) * W + q, tt)
    if WIDE:
        p = p.to(tl.int64)
    return p


@triton.jit
def _raw_delta(row, w_base, mask_t, mask_d, m2, sw_r, R: tl.constexpr):
    """dt_proj · xp[:R] as a (T, D) tile: R rank-1 updates (R is small: ceil(width / 16))."""
    raw = tl.zeros(m2.shape, tl.float32)
    for r in tl.static_range(R):
        lo = tl.load(row + r, mask=mask_t, other=0.0).to(tl.float32)
        wr = tl.load(w_base + r * sw_r, mask=mask_d, other=0.0).to(tl.float32)
        raw += lo[:, None] * wr[None, :]
    return raw


@triton.jit
def _load_step(u_base, dl_base, xp_base, w_base, t, L, H, W, inv_h, rev, cols, mask_d, offs_n, mask_n, su_l, sd_l,
               sxp_l, sw_r, R: tl.constexpr, N: tl.constexpr, DELTA_IN: tl.constexpr, WIDE: tl.constexpr):
    """u and raw Δ (no bias) as (T, D) tiles, B and C as (T, N) tiles, at route steps t; the pixels p(t).

    Raw Δ is read from its materialised (K, batch, L, C) tensor (DELTA_IN), or computed here as
    dt_proj · xp[:R] from the pixel's projections.
    """
    mask_t = (t < L) & (t >= 0)
    p = _pixel(t, L, H, W, inv_h, rev, cols, WIDE)
    m2 = mask_t[:, None] & mask_d[None, :]
    mtn = mask_t[:, None] & mask_n[None, :]
    u = tl.load(u_base + p[:, None] * su_l, mask=m2, other=0.0).to(tl.float32)
    row = xp_base + p * sxp_l
    if DELTA_IN:
        raw = tl.load(dl_base + p[:, None] * sd_l, mask=m2, other=0.0).to(tl.float32)
    else:
        raw = _raw_delta(row, w_base, mask_t, mask_d, m2, sw_r, R)
    Bt = tl.load(row[:, None] + R + offs_n[None, :], mask=mtn, other=0.0).to(tl.float32)
    Ct = tl.load(row[:, None] + (R + N) + offs_n[None, :], mask=mtn, other=0.0).to(tl.float32)
    return u, raw, Bt, Ct, p, m2


@triton.jit
def _discretize(raw, bias, u, Bt, A2, m2, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, LANES: tl.constexpr):
    """Δ = softplus(raw + bias) (0 outside the mask) and its slope dΔ/d(raw + bias) as (T, D) tiles, the
    decays a = exp(Δ A) and inputs x = Δ u B as (T, D, N) tiles, or (T, N, D) with LANES (A2 is then
    (N, D)). The forward never uses the slope, and the compiler drops it there."""
    dt = raw + bias[None, :]
    slope = tl.full(dt.shape, 1.0, tl.float32)
    if SOFTPLUS:
        dt, slope = _softplus_and_slope(dt, FAST)
    dt = tl.where(m2, dt, 0.0)
    a = _exp2(_per_channel(dt, LANES) * A2[None, :, :], FAST)
    x = _per_channel(dt * u, LANES) * _per_state(Bt, LANES)
    return dt, a, x, slope


@triton.jit
def _route_program(A_ptr, bias_ptr, D_ptr, CH, N: tl.constexpr, NSEQ: tl.constexpr, HAS_D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channel block, route k (reversed? column-major?), image b and its parameters."""
    pid_d = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < CH
    kd = (k * CH + offs_c).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mdn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + kd[:, None] * N + offs_n[None, :], mask=mdn, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
    dskip = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
    return pid_d, k, b, k >= NSEQ, (k % NSEQ) == 1, offs_c, mask_d, kd, offs_n, mask_n, mdn, A, bias, dskip


@triton.jit
def _state_tiles(A, kd, offs_n, mask_d, mask_n, LANES: tl.constexpr):
    """(A, row index, state index, mask) of the program's (channel, state) tiles: (D, N), or (N, D)
    with LANES. The row index is the channel's global row k*C + c of A and of the saved states."""
    row_s, n_s, mask_s = _state_grid(kd, offs_n, mask_d, mask_n, LANES)
    if LANES:
        A = tl.trans(A)
    return A, row_s, n_s, mask_s


@triton.jit
def _core_fwd_kernel(
    u_ptr, xp_ptr, w_ptr, dl_ptr, A_ptr, D_ptr, bias_ptr, y_ptr, hws_ptr,
    L, H, W, inv_h, CH, KC, n_saved,
    su_b, su_l, su_c, sxp_b, sxp_l, sxp_k, sw_k, sw_c, sw_r, sy_k, sy_b, sy_l, sy_c,
    R: tl.constexpr, N: tl.constexpr, NSEQ: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, PREFETCH: tl.constexpr,
    DELTA_IN: tl.constexpr, FAST: tl.constexpr, WIDE: tl.constexpr, SAVE_T: tl.constexpr, LANES: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Tiles are (steps, channels, states); with LANES (steps, states, channels) instead, so that with
    the channels (contiguous in memory) across the lanes each lane owns one channel and all of its
    states: the sum over states for y takes no shuffles, and Δ is computed once per channel instead
    of once per (channel, state) lane."""
    pid_d, k, b, rev, cols, offs_c, mask_d, kd, offs_n, mask_n, mdn, A, bias, dskip = _route_program(
        A_ptr, bias_ptr, D_ptr, CH, N, NSEQ, HAS_D, BLOCK_D, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)

    u_base = u_ptr + b * su_b + offs_c[None, :].to(tl.int64) * su_c
    xp_base = xp_ptr + b * sxp_b + k * sxp_k
    w_base = w_ptr + k * sw_k + offs_c * sw_c
    # int64 route offsets: K * batch * L * C may pass 2**31 even where one image's offsets do not
    y_base = y_ptr + k.to(tl.int64) * sy_k + b * sy_b + offs_c[None, :].to(tl.int64) * sy_c
    dl_base = dl_ptr + k.to(tl.int64) * sy_k + b * sy_b + offs_c[None, :].to(tl.int64) * sy_c  # raw Δ, laid out like y
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == BLOCK_T - 1)[:, None, None]
    # states entering every SAVE_T steps, for the backward (SAVE_T = 0: not saved)
    # (batch, chunk, K*C, N): a warp's channels are adjacent, so each chunk's store is coalesced
    chunk_stride = KC * BLOCK_N + b * 0  # int64 (b is), so chunk offsets cannot overflow
    A_s, row_s, n_s, state_mask = _state_tiles(A, kd, offs_n, mask_d, mask_n, LANES)
    A2 = A_s * 1.4426950408889634
    hws_base = hws_ptr + (b * n_saved * KC + row_s) * BLOCK_N + n_s
    h = tl.zeros(state_mask.shape, tl.float32)
    if PREFETCH:
        nx = _load_step(u_base, dl_base, xp_base, w_base, offs_t, L, H, W, inv_h, rev, cols, mask_d, offs_n,
                        mask_n, su_l, sy_l, sxp_l, sw_r, R, N, DELTA_IN, WIDE)
    # STAGES > 1: Triton's software pipeliner keeps that many chunks' loads in flight
    for t0 in tl.range(0, L, BLOCK_T, num_stages=STAGES):
        if PREFETCH:
            # software pipelining: the next chunk's loads are in flight during this chunk's scan
            u, raw, Bt, Ct, p, m2 = nx
            nx = _load_step(u_base, dl_base, xp_base, w_base, t0 + BLOCK_T + offs_t, L, H, W, inv_h, rev, cols,
                            mask_d, offs_n, mask_n, su_l, sy_l, sxp_l, sw_r, R, N, DELTA_IN, WIDE)
        else:
            u, raw, Bt, Ct, p, m2 = _load_step(u_base, dl_base, xp_base, w_base, t0 + offs_t, L, H, W, inv_h, rev,
                                               cols, mask_d, offs_n, mask_n, su_l, sy_l, sxp_l, sw_r, R, N, DELTA_IN,
                                               WIDE)
        dt, a, x, _ = _discretize(raw, bias, u, Bt, A2, m2, SOFTPLUS, FAST, LANES)
        if SAVE_T > 0:  # (LANES chunks may be shorter than the saving interval)
            _save_entry_state(h, t0, hws_base, chunk_stride, state_mask, SAVE_T, BLOCK_T % SAVE_T == 0)
        hs, h_next = _scan_chunk(a, x, h, first, last)
        if SAVE_T > 0:
            _save_inner_states(hs, t0, offs_t, L, hws_base, chunk_stride, state_mask, SAVE_T, BLOCK_T)
        h = h_next
        y = tl.sum(hs * _per_state(Ct, LANES), axis=2 - LANES)
        if HAS_D:
            y += dskip[None, :] * u
        tl.store(y_base + p[:, None] * sy_l, y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _state_after(h, t, u_base, dl_base, xp_base, L, H, W, inv_h, rev, cols, mask_d, offs_n, mask_n, su_l, sd_l,
                 sxp_l, A2, bias, first, last, R: tl.constexpr, N: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST: tl.constexpr, WIDE: tl.constexpr, LANES: tl.constexpr):
    """The state after the chunk of steps t entered with state h (the backward's recomputation)."""
    u, raw, Bt, Ct, p, m2 = _load_step(u_base, dl_base, xp_base, dl_base, t, L, H, W, inv_h, rev, cols, mask_d,
                                       offs_n, mask_n, su_l, sd_l, sxp_l, 0, R, N, True, WIDE)
    _, a, x, _ = _discretize(raw, bias, u, Bt, A2, m2, SOFTPLUS, FAST, LANES)
    _, h = _scan_chunk(a, x, h, first, last)
    return h


@triton.jit
def _bwd_loads(t, u_base, dl_base, xp_base, gy_base, L, H, W, inv_h, rev, cols, mask_d, offs_n, mask_n, su_l, sd_l,
               sxp_l, sg_l, R: tl.constexpr, N: tl.constexpr, WIDE: tl.constexpr):
    """The backward's inputs at route steps t (zero outside 0 <= t < L): u, raw Δ, B, C, the output
    gradient gy, and the pixels p(t) with their (T, D) mask."""
    u, raw, Bt, Ct, p, m2 = _load_step(u_base, dl_base, xp_base, dl_base, t, L, H, W, inv_h, rev, cols, mask_d,
                                       offs_n, mask_n, su_l, sd_l, sxp_l, 0, R, N, True, WIDE)
    gy = tl.load(gy_base + p[:, None] * sg_l, mask=m2, other=0.0).to(tl.float32)
    return u, raw, Bt, Ct, gy, p, m2


@triton.jit
def _bwd_chunk(t, u, raw, Bt, Ct, gy, p, m2, h0, g, dl_base, du_base, ddt_base, bc_row, L, H, W, inv_h, rev, cols,
               mask_d, mask_n, sd_l, sbc_l, A, A2, bias, dskip, first, last, N: tl.constexpr, HAS_D: tl.constexpr,
               SOFTPLUS: tl.constexpr, FAST: tl.constexpr, WIDE: tl.constexpr, FLIP: tl.constexpr,
               LANES: tl.constexpr, HALVING: tl.constexpr = 0):
    """One chunk of the backward (steps t, their inputs from :func:`_bwd_loads`, entry state h0, adjoint
    carry g from the chunk after it): stores du, ddelta and the dB/dC partials, returns (g for the chunk
    before, dA, dD and dbias partials). Tiles are (T, D, N), or (T, N, D) with LANES (A and A2 then
    (N, D)); HALVING: dB / dC summed over the channel lanes by halving (``_chunk_gradients``)."""
    mtn = (t < L)[:, None] & mask_n[None, :]
    dt, a, x, slope = _discretize(raw, bias, u, Bt, A2, m2, SOFTPLUS, FAST, LANES)
    dtu = dt * u
    hs, _ = _scan_chunk(a, x, h0, first, last)
    cg = _per_state(Ct, LANES) * _per_channel(gy, LANES)
    if LANES:  # the decays a_{t+1} recomputed (module docstring of selective_scan)
        tn = t + 1
        m2n = (tn < L)[:, None] & mask_d[None, :]
        pn = _pixel(tn, L, H, W, inv_h, rev, cols, WIDE)
        dtn = tl.load(dl_base + pn[:, None] * sd_l, mask=m2n, other=0.0).to(tl.float32) + bias[None, :]
        if SOFTPLUS:
            dtn = _softplus(dtn, FAST)
        dtn = tl.where(m2n, dtn, 0.0)
        an = tl.where(_per_channel(m2n, LANES), _exp2(_per_channel(dtn, LANES) * A2[None, :, :], FAST), 0.0)
        gs, g = _adjoint_chunk_next(an, cg, g, first, last, FLIP)
    else:
        gs, g = _adjoint_chunk(a, cg, g, first, last, FLIP)  # the adjoint runs down the route
    dA_p, dD_p, du, ddt, dBp, dCp = _chunk_gradients(gs, hs, x, dt, dtu, u, gy, slope, A, A2, Bt, dskip, m2,
                                                     HAS_D, SOFTPLUS, LANES, False, HALVING)
    tl.store(du_base + p[:, None] * sd_l, du.to(du_base.dtype.element_ty), mask=m2)
    tl.store(ddt_base + p[:, None] * sd_l, ddt.to(ddt_base.dtype.element_ty), mask=m2)
    if HALVING:  # one (T, 32) tile: dB's and dC's sums side by side, as the partials' last axis holds them
        is_c, n, keep = _halved_lanes(N, mask_n.shape[0], mask_d.shape[0])
        tl.store(bc_row + p[:, None] * sbc_l + (is_c * N + n)[None, :], dBp, mask=(t < L)[:, None] & keep[None, :])
    else:
        bc_ptrs = bc_row + p[:, None] * sbc_l + tl.arange(0, mask_n.shape[0])[None, :]
        tl.store(bc_ptrs, dBp, mask=mtn)
        tl.store(bc_ptrs + N, dCp, mask=mtn)
    return g, dA_p, dD_p, tl.sum(ddt, axis=0)


# The backward's channel strides are never specialised (they are 1): Triton would otherwise vectorise
# its loads along the channels and spread a tile's time steps over several lanes, making both of its
# scans cross-lane. Unspecialised, each lane owns one channel and all its steps; a warp still reads
# one contiguous segment of channels per step. (H200, stage-1 shapes: 2x faster backward; the forward
# is faster specialised.)
@triton.jit(do_not_specialize=["sg_c", "su_c", "sd_c"])
def _core_bwd_kernel(
    gy_ptr, u_ptr, xp_ptr, dl_ptr, A_ptr, D_ptr, bias_ptr, hws_ptr, scr_ptr,
    du_ptr, ddt_ptr, dA_ptr, dbc_ptr, dD_ptr, dbias_ptr,
    L, H, W, inv_h, CH, KC, n_saved,
    sg_k, sg_b, sg_l, sg_c, su_b, su_l, su_c, sxp_b, sxp_l, sxp_k,
    sd_k, sd_b, sd_l, sd_c, sbc_blk, sbc_b, sbc_l, sbc_k,
    R: tl.constexpr, N: tl.constexpr, NSEQ: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SAVE_T: tl.constexpr, FAST: tl.constexpr,
    WIDE: tl.constexpr, HAS_STATES: tl.constexpr, FLIP: tl.constexpr, LANES: tl.constexpr,
    PREFETCH: tl.constexpr, STAGES: tl.constexpr, HALVING: tl.constexpr = 0,
):
    """Chunks of BLOCK_T steps walked in reverse from the states entering every SAVE_T steps.

    SAVE_T = BLOCK_T by default. LANES chunks (tiles (steps, states, channels)) may be shorter than
    the saving interval: then a forward pass from each interval's saved state first writes the entry
    state of every chunk to this program's scratch (SAVE_T / BLOCK_T states, in L2). PREFETCH (with
    SAVE_T = BLOCK_T only) loads the next chunk's inputs and entry state while the current chunk is
    computed, as the forward's PREFETCH does.
    """
    pid_d, k, b, rev, cols, offs_c, mask_d, kd, offs_n, mask_n, mdn, A, bias, dskip = _route_program(
        A_ptr, bias_ptr, D_ptr, CH, N, NSEQ, HAS_D, BLOCK_D, BLOCK_N)
    A_s, row_s, n_s, state_mask = _state_tiles(A, kd, offs_n, mask_d, mask_n, LANES)
    A2 = A_s * 1.4426950408889634
    offs_t = tl.arange(0, BLOCK_T)
    SUB: tl.constexpr = SAVE_T // BLOCK_T

    c64 = offs_c[None, :].to(tl.int64)
    u_base = u_ptr + b * su_b + c64 * su_c
    gy_base = gy_ptr + k.to(tl.int64) * sg_k + b * sg_b + c64 * sg_c
    xp_base = xp_ptr + b * sxp_b + k * sxp_k
    dl_base = dl_ptr + k.to(tl.int64) * sd_k + b * sd_b + c64 * sd_c  # raw Δ, laid out like du and ddelta
    du_base = du_ptr + k.to(tl.int64) * sd_k + b * sd_b + c64 * sd_c
    ddt_base = ddt_ptr + k.to(tl.int64) * sd_k + b * sd_b + c64 * sd_c
    # dB / dC partials of this channel block: (blocks, batch, L, K, 2N) float32
    bc_row = dbc_ptr + pid_d * sbc_blk + b * sbc_b + k * sbc_k
    hws_base = hws_ptr + (b * n_saved * KC + row_s) * BLOCK_N + n_s  # (batch, interval, K*C, N)
    interval_stride = KC * BLOCK_N + b * 0  # int64 (b is), so interval offsets cannot overflow
    program = (b * tl.num_programs(1) + k) * tl.num_programs(0) + pid_d
    tile = BLOCK_N * BLOCK_D
    # (row_s less the block's first row: the channel within the block, in the state tiles' orientation)
    scr_base = scr_ptr + program * (SUB * tile) + n_s * BLOCK_D + (row_s - (k * CH + pid_d * BLOCK_D))
    first = (offs_t == 0)[:, None, None]
    last = (offs_t == BLOCK_T - 1)[:, None, None]

    if not HAS_STATES:  # the forward did not save them: pass 1 along the route stores the interval-entry states
        h = tl.zeros(state_mask.shape, tl.float32)
        for c in range(0, n_saved):
            tl.store(hws_base + c * interval_stride, h, mask=state_mask)
            for j in range(0, SUB):
                h = _state_after(h, (c * SUB + j) * BLOCK_T + offs_t, u_base, dl_base, xp_base, L, H, W, inv_h, rev,
                                 cols, mask_d, offs_n, mask_n, su_l, sd_l, sxp_l, A2, bias, first, last, R, N,
                                 SOFTPLUS, FAST, WIDE, LANES)
        tl.debug_barrier()

    # Pass 2: chunks in reverse; the adjoint's carry a_t g_t (g_t = C_t gy_t + a_{t+1} g_{t+1}) in registers.
    g = tl.zeros(state_mask.shape, tl.float32)
    dA_acc = tl.zeros(state_mask.shape, tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    if PREFETCH:  # the last chunk's inputs and entry state
        c = n_saved - 1
        nx_u, nx_raw, nx_B, nx_C, nx_gy, nx_p, nx_m2 = _bwd_loads(
            c * BLOCK_T + offs_t, u_base, dl_base, xp_base, gy_base, L, H, W, inv_h, rev, cols, mask_d, offs_n,
            mask_n, su_l, sd_l, sxp_l, sg_l, R, N, WIDE)
        nx_h = tl.load(hws_base + c * interval_stride, mask=state_mask, other=0.0)
    for i in tl.range(0, n_saved, num_stages=STAGES):  # STAGES > 1: Triton's pipeliner, as in the forward
        c = n_saved - 1 - i
        if PREFETCH:
            u, raw, Bt, Ct, gy, p, m2, h = nx_u, nx_raw, nx_B, nx_C, nx_gy, nx_p, nx_m2, nx_h
            # the chunk before (none when c = 0: every load is masked)
            nx_u, nx_raw, nx_B, nx_C, nx_gy, nx_p, nx_m2 = _bwd_loads(
                (c - 1) * BLOCK_T + offs_t, u_base, dl_base, xp_base, gy_base, L, H, W, inv_h, rev, cols, mask_d,
                offs_n, mask_n, su_l, sd_l, sxp_l, sg_l, R, N, WIDE)
            nx_h = tl.load(hws_base + (c - 1) * interval_stride, mask=state_mask & (c > 0), other=0.0)
        else:
            h = tl.load(hws_base + c * interval_stride, mask=state_mask, other=0.0)
        if SUB > 1:
            tl.store(scr_base, h)
            for j in range(0, SUB - 1):  # entry states of the interval's later chunks
                h = _state_after(h, (c * SUB + j) * BLOCK_T + offs_t, u_base, dl_base, xp_base, L, H, W, inv_h, rev,
                                 cols, mask_d, offs_n, mask_n, su_l, sd_l, sxp_l, A2, bias, first, last, R, N,
                                 SOFTPLUS, FAST, WIDE, LANES)
                tl.store(scr_base + (j + 1) * tile, h)
            tl.debug_barrier()  # the scratch is read by other threads than wrote it
        for jj in range(0, SUB):
            j = SUB - 1 - jj
            t = (c * SUB + j) * BLOCK_T + offs_t
            if SUB > 1:
                h = tl.load(scr_base + j * tile)
            if not PREFETCH:
                u, raw, Bt, Ct, gy, p, m2 = _bwd_loads(t, u_base, dl_base, xp_base, gy_base, L, H, W, inv_h, rev,
                                                       cols, mask_d, offs_n, mask_n, su_l, sd_l, sxp_l, sg_l, R, N,
                                                       WIDE)
            g, dA_p, dD_p, dbias_p = _bwd_chunk(t, u, raw, Bt, Ct, gy, p, m2, h, g, dl_base, du_base, ddt_base,
                                                bc_row, L, H, W, inv_h, rev, cols, mask_d, mask_n, sd_l, sbc_l, A_s,
                                                A2, bias, dskip, first, last, N, HAS_D, SOFTPLUS, FAST, WIDE, FLIP,
                                                LANES, HALVING)
            dA_acc += dA_p
            if HAS_D:
                dD_acc += dD_p
            dbias_acc += dbias_p
        if SUB > 1:
            tl.debug_barrier()  # before the next interval overwrites the scratch

    # per-batch partials, reduced over the batch on the host side
    tl.store(dA_ptr + (b * KC + row_s) * N + n_s, dA_acc, mask=state_mask)
    tl.store(dbias_ptr + b * KC + kd, dbias_acc, mask=mask_d)
    if HAS_D:
        tl.store(dD_ptr + b * KC + kd, dD_acc, mask=mask_d)


MAX_PIXELS = 2**22  # per map: the float32 route-step → pixel mapping is exact below this (see _pixel)


def _shapes(u, xp, dt_weight, A, nseq):
    batch, length, channels = u.shape
    routes, _, rank = dt_weight.shape
    state = A.shape[1]
    if routes not in (nseq, 2 * nseq):
        raise ValueError(f"{routes} routes do not fit {nseq} visiting orders")
    if tuple(xp.shape) != (batch, length, routes, rank + 2 * state) or xp.stride(-1) != 1:
        raise ValueError(f"xp must be ({batch}, {length}, {routes}, {rank + 2 * state}) with a unit last "
                         f"stride, got {tuple(xp.shape)} strides {xp.stride()}")
    if tuple(A.shape) != (routes * channels, state) or not A.is_contiguous():
        raise ValueError(f"A must be a contiguous ({routes * channels}, {state}), got {tuple(A.shape)}")
    if length >= MAX_PIXELS:
        raise ValueError(f"the fused SS2D core scans maps of fewer than {MAX_PIXELS} pixels, got {length}")
    return batch, length, channels, routes, rank, state


def _wide(length, *pixel_strides):
    """Whether pixel offsets (pixel index times a per-pixel stride) may pass int32 inside one image."""
    return length * max(pixel_strides) >= 2**31


_SHAPE_KEYS = ("BLOCK_D", "BLOCK_N", "BLOCK_T", "num_warps", "PREFETCH", "STAGES")


def core_config(channels, state, rank, backward, length, elem_size, overrides=None, saving=False):
    """Launch configuration of the fused kernels (``overrides`` and VMAMBA_TRITON_SCAN_CONFIG win);
    ``saving``: a forward that keeps the backward's states.

    d_state 1-2 (the v2 models), from H200 sweeps of benchmarks/gpu_ss2d_sweep.py (BENCHMARKS.md): one
    warp; the backward in chunks of 4 steps, loading the next chunk's inputs while it computes the
    current one (PREFETCH; VMamba-S, session 8: stages 1-3 9-18 % faster than without it at 80 or 128
    registers); the forward computes Δ in the kernel while the rank is small (R <= 8: stage 1 of the
    tiny and small models; 32-step chunks through Triton's pipeliner, session 10) and otherwise reads it
    from one batched GEMM (DELTA_GEMM), two channels per lane, in 4-step chunks for rows of up to 64
    (session 20). d_state 3-16 (vanilla models): LANES tiles, one channel and all its states per lane;
    forward in chunks of 4 steps with Δ from the GEMM, capped at 128 registers at d_state 9-16 unless it
    keeps states (session 20), backward in 2-step chunks inside the 16-step saved-state interval
    (session 6 sweep at vanilla-T stages 1 and 3: forward 9x and 32x, backward 2.9x and 2.9x faster than
    the (channel, state)-per-lane tiles), dB / dC summed over the lanes by recursive halving (HALVING;
    session 17: 25-30 % faster at every stage); at d_state 9-16 the backward takes 16 channels a warp,
    each channel's states on two lanes, capped at 128 registers (sessions 19-20). Larger d_state: the
    plain selective-scan defaults' tile shape. The backwards run their adjoint as a forward scan of the
    time-flipped chunk (FLIP: no shuffles for Triton's reverse scan; session 5: 11 % faster at d_state 1
    and 7 % at d_state 16, stages 1 and 3; session 17 with HALVING: stage 1 18.07 ms against 20.56 in
    reverse).
    """
    plain = default_config(channels, state, backward, length, elem_size)
    # only the plain defaults' tile shape: their register caps, row packing and layouts are tuned for the plain
    # kernels (a plain cap once leaked into the core's training forward, session 20); the core sets its own
    defaults = {key: plain[key] for key in _SHAPE_KEYS if key in plain}
    if backward:
        defaults.update(BLOCK_T=saved_state_chunk(state), FLIP=1)
    if state <= 2:
        if backward:
            defaults.update(BLOCK_D=32, num_warps=1, maxnreg=128, PREFETCH=1, STAGES=1)
        elif rank > 8:
            # 4-step chunks for rows of up to 64 (session 20, VMamba-T[s1l8] stage 4 bf16, same run:
            # 0.0696 ms against 0.0750, keeping states 0.0801 against 0.0823; stages 2-3 lost, 0.262 against
            # 0.232 and 0.133 against 0.121)
            block_t = 4 if length <= 64 else 8
            defaults.update(BLOCK_D=64, BLOCK_T=block_t, num_warps=1, PREFETCH=1, DELTA_GEMM=1, STAGES=1)
        else:  # VMamba-S stage 1 bf16: 0.810 ms against 1.185 with 8-step chunks and PREFETCH (session 10)
            defaults.update(BLOCK_D=32, BLOCK_T=32, num_warps=1, PREFETCH=0, DELTA_GEMM=0, STAGES=3)
            if saving:
                # the series softplus (SHORT_SOFTPLUS 0): keeping states the short one spills more (452 bytes
                # against 376, Triton 3.6) and lost (VMamba-T[s1l8] stage 1 bf16, session 22: 0.5906 against
                # 0.3904 ms); without keeping states it won, 0.3468 against 0.3645
                defaults["SHORT_SOFTPLUS"] = 0
    elif state <= 16:
        if backward:
            # dB / dC summed over the channel lanes by halving (session 17, vanilla-T bf16 with saved states,
            # against the session-16 defaults: stages 1-4 18.07 / 8.92 / 4.86 / 2.90 ms against 25.86 /
            # 12.79 / 6.55 / 3.85)
            # d_state 9-16: 16 channels, each channel's states on two lanes (with saved states, same run:
            # session 19, stage 1 17.61 ms against 17.86, stage 3 4.31 against 4.59; session 20, stage 2
            # 8.45 against 8.72, stage 4 2.55 against 2.72), capped at 128 registers (uncapped 165: 12 warps
            # an SM; session 20, same run, stages 1-4 15.31 / 7.39 / 3.79 / 2.29 ms against 17.43 / 8.46 /
            # 4.28 / 2.55; caps 112 and 96 spill more and lost; 4-step chunks lost, 20.1 ms at stage 1)
            defaults.update(LANES=1, BLOCK_D=32, BLOCK_T=2, num_warps=1, FLIP=1, HALVING=1)
            if _next_pow2(state) == 16:
                defaults.update(BLOCK_D=16, maxnreg=128)
        else:
            defaults.update(LANES=1, BLOCK_D=64, BLOCK_T=4, num_warps=2, PREFETCH=1, DELTA_GEMM=1)
            if _next_pow2(state) == 16 and not saving:
                # capped at 128 registers (uncapped 166; session 20, vanilla-T bf16, same runs: stages 1-4
                # 2.211 / 1.062 / 0.534 / 0.287 ms against 2.314 / 1.120 / 0.556 / 0.301; keeping states it
                # spills 546 bytes and lost, 8.31 against 2.77 ms at stage 1)
                defaults["maxnreg"] = 128
    return _config(channels, state, backward, overrides, length, elem_size, defaults=defaults)


def saved_state_chunk(state: int) -> int:
    """Steps between the states the forward saves for the backward: the backward's chunk length."""
    if state <= 2:
        return 4
    return LANES_SAVE_INTERVAL if state <= 16 else default_config(1, state, True)["BLOCK_T"]


def saved_states_shape(batch: int, routes: int, channels: int, length: int, state: int) -> tuple[int, ...]:
    """Shape of the float32 states the forward saves (the state entering every chunk of the backward)."""
    return batch, cdiv(length, saved_state_chunk(state)), routes * channels, triton.next_power_of_2(state)


@triton.jit
def _delta_gemm_kernel(xp_ptr, w_ptr, out_ptr, M, C, sxp_m, sxp_k, sw_k, sw_c, so_k, so_m,
                       R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                       PRECISION: tl.constexpr):
    """out[k, m, c] = Σ_r xp[m, k, r] w[k, c, r] for one (BLOCK_M, BLOCK_C) tile of route k."""
    pid_m, pid_c, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    mask_m, mask_c, mask_r = rows < M, cols < C, r < R
    a = tl.load(xp_ptr + rows[:, None].to(tl.int64) * sxp_m + k * sxp_k + r[None, :],
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    w = tl.load(w_ptr + k * sw_k + cols[None, :] * sw_c + r[:, None], mask=mask_r[:, None] & mask_c[None, :],
                other=0.0)
    # float32 operands: TF32 is exact for bf16 and fp16 values (10 mantissa bits), and the interpreter
    # multiplies float32 correctly but not bf16
    acc = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
    out = out_ptr + k.to(tl.int64) * so_k + rows[:, None].to(tl.int64) * so_m + cols[None, :]  # K*M*C >= 2^31
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


DELTA_GEMM_CONFIG = {"BLOCK_M": 64, "BLOCK_C": 128, "num_warps": 4}


def delta_gemm(xp, dt_weight, rank, dtype, config=None):
    """Δ before bias, (K, batch*L, C) in route-major pixel order, with xp (batch, L, K, R + 2N) and
    dt_weight (K, C, R): Δ_k = xp[..., k, :R] @ dt_weight_k^T for every route.

    A Triton kernel rather than ``torch.bmm``: with an inner dimension of R <= 64 cuBLAS' kernels are
    bound by latency (H200, VMamba-S stage 3: 165 µs for a 154 MB output, 0.9 TB/s), while this one
    only streams the output. float32 inputs multiply in full precision unless PyTorch's matmuls may use
    TF32 (``torch.backends.cuda.matmul.allow_tf32``), as ``torch.bmm`` would.
    """
    cfg = {**DELTA_GEMM_CONFIG, **(config or {})}
    batch, length, routes, width = xp.shape
    channels = dt_weight.shape[1]
    xp = xp.reshape(batch * length, routes, width)
    if xp.stride(2) != 1:
        xp = xp.contiguous()
    weight = dt_weight.to(dtype)
    if weight.stride(2) != 1:
        weight = weight.contiguous()
    rows = batch * length
    out = torch.empty(routes, rows, channels, device=xp.device, dtype=dtype)
    if out.numel() == 0:
        return out.zero_()
    exact_in_tf32 = dtype in (torch.bfloat16, torch.float16)
    precision = "tf32" if exact_in_tf32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (cdiv(rows, cfg["BLOCK_M"]), cdiv(channels, cfg["BLOCK_C"]), routes)
    _delta_gemm_kernel[grid](
        xp, weight, out, rows, channels, xp.stride(0), xp.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), R=rank, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_R=max(16, triton.next_power_of_2(rank)), PRECISION=precision, num_warps=cfg["num_warps"],
    )
    return out


def ss2d_scan_fwd(u, xp, dt_weight, A, D, delta_bias, height, width, nseq, delta_softplus=True,
                  out_dtype=None, config=None, save_states=False):
    """Scan the K routes of the map u (batch, H*W, C); returns y (K, batch, H*W, C) in pixel order and
    the states saved for the backward (shape :func:`saved_states_shape`; empty unless ``save_states``).

    xp (batch, L, K, R + 2N) holds each pixel's per-route projections (Δ input, B, C); dt_weight
    (K, C, R) the Δ projections; A (K*C, N) float32; D, delta_bias (K*C,) (D may be None).
    ``config`` overrides block sizes, ``DELTA_GEMM`` (see the module docstring) and ``LANES`` (one
    channel and all its states per lane; see :func:`_core_fwd_kernel`).
    """
    batch, length, channels, routes, rank, state = _shapes(u, xp, dt_weight, A, nseq)
    cfg = core_config(channels, state, rank, False, length, u.element_size(), config, saving=save_states)
    y = torch.empty(routes, batch, length, channels, device=u.device, dtype=out_dtype or u.dtype)
    save_chunk = saved_state_chunk(state) if save_states else 0
    shape = saved_states_shape(batch, routes, channels, length, state) if save_states else (0,)
    states = torch.empty(shape, device=u.device, dtype=torch.float32)
    if y.numel() == 0:
        return y, states.zero_()
    lanes = bool(cfg.get("LANES", 0))
    # (with LANES, chunks shorter than the saving interval save at the interval's chunk starts)
    if save_chunk and cfg["BLOCK_T"] % save_chunk and not (lanes and save_chunk % cfg["BLOCK_T"] == 0):
        cfg["BLOCK_T"] = save_chunk
    delta_in = bool(cfg.get("DELTA_GEMM", 0))
    delta = delta_gemm(xp, dt_weight, rank, u.dtype).view(y.shape) if delta_in else y
    grid = (cdiv(channels, cfg["BLOCK_D"]), routes, batch)
    _core_fwd_kernel[grid](
        u, xp, dt_weight, delta, A, D if D is not None else A, delta_bias, y, states,
        length, height, width, 1.0 / height, channels, routes * channels, shape[1] if save_states else 0,
        *u.stride(), xp.stride(0), xp.stride(1), xp.stride(2), *dt_weight.stride(), *y.stride(),
        R=rank, N=state, NSEQ=nseq, HAS_D=D is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"],
        PREFETCH=bool(cfg.get("PREFETCH", 0)), STAGES=int(cfg.get("STAGES", 1)), DELTA_IN=delta_in,
        FAST=fast_math(u, short_softplus=bool(cfg.get("SHORT_SOFTPLUS", 1))),
        WIDE=_wide(length, u.stride(1), xp.stride(1), y.stride(2)), SAVE_T=save_chunk, LANES=lanes,
        **launch_options(cfg),
    )
    return y, states


def ss2d_scan_bwd(grad_y, u, xp, dt_weight, A, D, delta_bias, height, width, nseq, delta_softplus=True,
                  config=None, states=None):
    """Gradients of :func:`ss2d_scan_fwd` for the routes' output gradient grad_y (K, batch, L, C).

    grad_y may be an expanded view (stride 0 over K, as the gradient of a sum over routes is).
    Returns du (K, batch, L, C) and ddelta (K, batch, L, C) in u's dtype (per route: the caller sums
    du over K and turns ddelta into gradients of xp and dt_weight), dBC (batch, L, K, 2N) float32,
    dA (K*C, N), dD (K*C,) or None and ddelta_bias (K*C,), float32. All reductions are deterministic.
    ``states``: what the forward saved (``save_states``); without them (None or empty) the kernel
    first re-runs the forward recurrence to find them.
    """
    batch, length, channels, routes, rank, state = _shapes(u, xp, dt_weight, A, nseq)
    cfg = core_config(channels, state, rank, True, length, u.element_size(), config)
    has_states = states is not None and states.numel() > 0
    lanes = bool(cfg.get("LANES", 0))
    save_chunk = saved_state_chunk(state)
    if lanes and save_chunk % cfg["BLOCK_T"]:
        raise ValueError(f"LANES: BLOCK_T must divide the saved-state interval {save_chunk}, got {cfg['BLOCK_T']}")
    if has_states:
        if not lanes:
            cfg["BLOCK_T"] = save_chunk
        check_states(states, saved_states_shape(batch, routes, channels, length, state))
    dev, f32 = u.device, torch.float32
    n_blk = cdiv(channels, cfg["BLOCK_D"])
    kc = routes * channels
    du = torch.empty(routes, batch, length, channels, device=dev, dtype=u.dtype)
    ddelta = torch.empty_like(du)
    # the kernel writes every element of these partials (dD only with D): no fills
    dbc = torch.empty(n_blk, batch, length, routes, 2 * state, device=dev, dtype=f32)
    dA = torch.empty(batch, kc, state, device=dev, dtype=f32)
    skip_parts = torch.empty(2, 1, batch, kc, device=dev, dtype=f32)  # dbias, dD: one source for the sums
    dbias, dD = skip_parts[0, 0], skip_parts[1, 0]
    if du.numel() == 0:  # nothing to scan: every gradient is zero
        zeros = dA.new_zeros
        return (du, ddelta, zeros(batch, length, routes, 2 * state), zeros(kc, state),
                zeros(kc) if D is not None else None, zeros(kc))
    # Δ without bias, in du's layout: one batched GEMM here instead of computing it three times per
    # step inside the kernel.
    delta = delta_gemm(xp, dt_weight, rank, u.dtype).view(du.shape)
    grid = (n_blk, routes, batch)
    # states every save_chunk steps (LANES; a scratch holds its chunks' entry states), else every chunk
    interval = save_chunk if lanes else cfg["BLOCK_T"]
    n_saved = cdiv(length, interval)
    hws = states if has_states else torch.empty(batch, n_saved, kc, cfg["BLOCK_N"], device=dev, dtype=f32)
    scratch = (torch.empty(n_blk * routes * batch, interval // cfg["BLOCK_T"], cfg["BLOCK_N"], cfg["BLOCK_D"],
                           device=dev, dtype=f32) if interval > cfg["BLOCK_T"] else hws)
    _core_bwd_kernel[grid](
        grad_y, u, xp, delta, A, D if D is not None else A, delta_bias, hws, scratch,
        du, ddelta, dA, dbc, dD, dbias,
        length, height, width, 1.0 / height, channels, kc, n_saved,
        *grad_y.stride(), *u.stride(), xp.stride(0), xp.stride(1), xp.stride(2),
        *du.stride(), dbc.stride(0), dbc.stride(1), dbc.stride(2), dbc.stride(3),
        R=rank, N=state, NSEQ=nseq, HAS_D=D is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"], SAVE_T=interval, FAST=fast_math(u),
        WIDE=_wide(length, grad_y.stride(2), u.stride(1), xp.stride(1), du.stride(2), dbc.stride(2)),
        HAS_STATES=has_states, FLIP=bool(cfg.get("FLIP", 0)), LANES=lanes,
        PREFETCH=bool(cfg.get("PREFETCH", 0)) and interval == cfg["BLOCK_T"], STAGES=int(cfg.get("STAGES", 1)),
        HALVING=halving(cfg, u), **launch_options(cfg),
    )
    (dbc_sum,), (dA_sum,), (dbias_sum, *dD_sum) = sum_partials(
        dbc.view(1, 1, n_blk, -1), dA.view(1, 1, batch, -1), skip_parts[:1 + (D is not None)])
    return (du, ddelta, dbc_sum.view(batch, length, routes, 2 * state), dA_sum.view(kc, state),
            dD_sum[0].view(kc) if D is not None else None, dbias_sum.view(kc))

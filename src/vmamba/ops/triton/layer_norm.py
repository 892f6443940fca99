"""LayerNorm over contiguous rows as Triton kernels, many rows per program.

The input is K >= 1 stacked (M, C) views summed in float32 before normalising (K = 1 is a plain
LayerNorm). Each program owns a (BLOCK_M, BLOCK_C) tile: BLOCK_C is the next power of two >= C (the
tail is masked) and BLOCK_M rows are chosen so that a program moves a few KB, which is what small
channel counts (96..768) need to keep the memory system busy; one row per program leaves most
lanes idle.

Forward, per row (statistics in float32):

    s = Σ_k x_k,  μ = mean(s),  rstd = 1 / sqrt(var(s) + eps),  y = (s - μ) rstd w + b

Backward, with x̂ = (s - μ) rstd and g = dy w:

    ds = rstd (g - x̂ mean(g x̂) - mean(g)),  dw = Σ_rows dy x̂,  db = Σ_rows dy

ds is the gradient of every one of the K inputs. dw and db are reduced deterministically: a bounded
number of programs each walks a contiguous run of tiles, writes its partial sums to one row of a
(programs, C) workspace, and torch sums the rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials

# Bytes of one input a program reads per tile: large enough to amortise the per-program overhead and
# to keep enough loads in flight, small enough for the tile to stay in registers.
TILE_BYTES = 8192
MAX_BLOCK_M = 128
# Backward programs: one per tile up to this many tiles per streaming multiprocessor, otherwise
# BWD_PROGRAMS_PER_SM per SM each accumulating dw/db partials over a run of tiles.
BWD_ONE_TILE_PER_PROGRAM_SM = 16
BWD_PROGRAMS_PER_SM = 4
# Without a GPU (the interpreter) a handful of programs is enough and keeps the workspace small.
INTERPRETER_PROGRAMS = 8

__all__ = ["bwd_launch_config", "layer_norm_fwd", "layer_norm_bwd", "tile_config"]


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, mean_ptr, rstd_ptr, M, C, stride_xk, stride_xm, eps,
                K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, STORE_SUM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_m = rows < M
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    rows64 = rows.to(tl.int64)

    x_ptrs = x_ptr + rows64[:, None] * stride_xm + cols[None, :]
    s = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    for _ in tl.static_range(1, K):
        x_ptrs += stride_xk  # pointer increments: no int32 product k * stride_xk to overflow
        s += tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)

    offs = rows64[:, None] * C + cols[None, :]
    if STORE_SUM:
        tl.store(sum_ptr + offs, s.to(sum_ptr.dtype.element_ty), mask=mask)

    mean = tl.sum(s, axis=1) / C
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = centred * rstd[:, None]
    if HAS_W:
        y *= tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_m)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, M, C, stride_dym, stride_xm,
                tiles_per_program, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    # Per-element accumulators, reduced over the tile rows once at the end: a reduction over the rows
    # of every tile crosses warps (H200, stage-1 shape: 0.12 -> 0.10 ms).
    dw = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)

    for i in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_c[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy

    if HAS_W:
        tl.store(dw_ptr + pid * C + cols, tl.sum(dw, axis=0), mask=mask_c)
    if HAS_B:
        tl.store(db_ptr + pid * C + cols, tl.sum(db, axis=0), mask=mask_c)


def tile_config(M: int, C: int, element_size: int, block_m: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for M rows of C elements of ``element_size`` bytes."""
    block_c = triton.next_power_of_2(C)
    if block_m is None:
        rows = max(1, TILE_BYTES // (block_c * element_size))
        block_m = min(1 << (rows.bit_length() - 1), MAX_BLOCK_M, triton.next_power_of_2(max(M, 1)))
    # About 16 elements per thread; the column reduction stays within a warp for small C.
    num_warps = max(1, min(8, block_m * block_c // 512))
    return block_m, block_c, num_warps


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() < 2 or t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"layer_norm: {name} needs rows with unit stride in the last dim, "
                         f"got shape {tuple(t.shape)} stride {t.stride()}")


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   out_dtype: torch.dtype, return_sum: bool = False, *, block_m: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LayerNorm of the float32 sum of K stacked inputs ``x`` (K, M, C); K = 1 is a plain LayerNorm.

    Returns (out (M, C) contiguous in ``out_dtype``, mean (M,), rstd (M,) float32, xsum). xsum is
    None unless ``return_sum``: then it is the pre-norm sum (M, C) in x.dtype, which the backward
    needs when K > 1 (for K = 1 it is the view ``x[0]``, no copy). ``block_m`` overrides the tile rows.
    """
    if x.dim() != 3:
        raise ValueError(f"layer_norm_fwd: x must be (K, M, C), got shape {tuple(x.shape)}")
    _check_rows("x", x)
    K, M, C = x.shape
    out = torch.empty((M, C), dtype=out_dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    store_sum = return_sum and K > 1
    xsum = torch.empty((M, C), dtype=x.dtype, device=x.device) if store_sum else None
    if return_sum and K == 1:
        xsum = x[0]
    if M == 0 or C == 0:
        return out, mean, rstd, xsum

    block_m, block_c, num_warps = tile_config(M, C, x.element_size(), block_m)
    _fwd_kernel[(triton.cdiv(M, block_m),)](
        x, weight if weight is not None else out, bias if bias is not None else out, out,
        xsum if store_sum else out, mean, rstd, M, C, x.stride(0), x.stride(1), eps,
        K=K, BLOCK_M=block_m, BLOCK_C=block_c, HAS_W=weight is not None, HAS_B=bias is not None,
        STORE_SUM=store_sum, num_warps=num_warps,
    )
    return out, mean, rstd, xsum


def _sm_count(device: torch.device) -> int | None:
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None


@functools.cache
def _cuda_sm_count(index: int) -> int:  # cached: the property query costs host time on every call
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_launch_config(M: int, C: int, element_size: int, sm_count: int | None,
                      block_m: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps, programs) of the backward for M rows of C elements.

    From the H200 sweep of benchmarks/gpu_layer_norm.py at VMamba-T's shapes (BENCHMARKS.md): tiles
    of 16 rows and 4 warps up to 512 columns; one program per tile while there are at most 16 tiles
    per SM, otherwise 4 programs per SM each walking a run of tiles (fewer dw/db partials to sum).
    Wider rows keep the forward's tiles. Without an SM count (the interpreter) a few programs suffice.
    """
    block_c = triton.next_power_of_2(C)
    if block_c <= 512:
        block_m, num_warps = block_m or min(16, triton.next_power_of_2(max(M, 1))), 4
    else:
        block_m, _, num_warps = tile_config(M, C, element_size, block_m)
    tiles = triton.cdiv(M, block_m)
    if sm_count is None:
        programs = min(tiles, INTERPRETER_PROGRAMS)
    else:
        programs = tiles if tiles <= BWD_ONE_TILE_PER_PROGRAM_SM * sm_count else BWD_PROGRAMS_PER_SM * sm_count
    return block_m, block_c, num_warps, programs


def layer_norm_bwd(dout: torch.Tensor, xhat_src: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool, *, block_m: int | None = None,
                   num_programs: int | None = None, num_warps: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`layer_norm_fwd` given dout (M, C) and the pre-norm input xhat_src (M, C).

    Returns dx (M, C) contiguous in xhat_src.dtype (computed in float32; it is the gradient of each of
    the K summed inputs), and dweight / dbias (C,) float32, None when there is no weight / bias.
    ``block_m``, ``num_programs`` and ``num_warps`` override :func:`bwd_launch_config`.
    """
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    _check_rows("xhat_src", xhat_src)
    M, C = xhat_src.shape
    device = xhat_src.device
    dx = torch.empty((M, C), dtype=xhat_src.dtype, device=device)
    if M == 0 or C == 0:
        zeros = torch.zeros((C,), dtype=torch.float32, device=device)
        return dx, zeros if weight is not None else None, zeros.clone() if has_bias else None

    block_m, block_c, warps, programs = bwd_launch_config(
        M, C, max(xhat_src.element_size(), dout.element_size()), _sm_count(device), block_m)
    tiles = triton.cdiv(M, block_m)
    programs = min(tiles, num_programs or programs)
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program)
    # per-program partials of dweight and dbias, summed below in one launch (deterministic)
    n_sums = (weight is not None) + has_bias
    parts = torch.empty((n_sums, 1, programs, C), dtype=torch.float32, device=device)
    dw_part = parts[0, 0] if weight is not None else dx
    db_part = parts[-1, 0] if has_bias else dx
    _bwd_kernel[(programs,)](
        dout, xhat_src, weight if weight is not None else dx, mean, rstd, dx, dw_part, db_part, M, C,
        dout.stride(0), xhat_src.stride(0), tiles_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c, HAS_W=weight is not None, HAS_B=has_bias, num_warps=num_warps or warps,
    )
    if not n_sums:
        return dx, None, None
    (sums,) = sum_partials(parts)
    dweight = sums[0].view(C) if weight is not None else None
    dbias = sums[-1].view(C) if has_bias else None
    return dx, dweight, dbias

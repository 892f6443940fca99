"""Sums of the backward kernels' per-program partials (dA, dD, dbias over the batch; dB, dC over channel
blocks), up to three tensors of them in one launch.

PyTorch reduces each partial tensor in its own kernel, and its reductions over a leading axis are slow
at these shapes: at VMamba-T[s1l8] stage 4 (batch 128) the five sums of the scan's backward took 28 µs
of GPU time against 139 µs for the backward kernel itself (session 21). Here the sums run as one launch
of (BLOCK_P, BLOCK_N) tiles summed over their first axis, in a fixed order: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sum_partials"]

# programs one launch aims for (two per multiprocessor of an H200) before it makes its tiles wider
_TARGET_PROGRAMS = 264
# elements a program loads per step
_TILE_ELEMENTS = 4096


@triton.jit
def _sum_tile(src_ptr, dst_ptr, s, r, n0, R, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst[r, n0 : n0 + BLOCK_N] = Σ_p src[s, r, p, n0 : n0 + BLOCK_N]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    base = src_ptr + (s * R + r).to(tl.int64) * P * N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs_p
        x = tl.load(base + p.to(tl.int64)[:, None] * N + offs_n[None, :], mask=(p < P)[:, None] & (offs_n < N)[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(dst_ptr + r.to(tl.int64) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _job_tile(tile, src_ptr, dst0, dst1, dst2, R, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of a job: its slice s picks the destination."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    s = tile // (R * n_blocks)
    rest = tile - s * (R * n_blocks)
    r = rest // n_blocks
    n0 = (rest - r * n_blocks) * BLOCK_N
    if s == 0:
        _sum_tile(src_ptr, dst0, s, r, n0, R, P, N, BLOCK_P, BLOCK_N)
    elif s == 1:
        _sum_tile(src_ptr, dst1, s, r, n0, R, P, N, BLOCK_P, BLOCK_N)
    else:
        _sum_tile(src_ptr, dst2, s, r, n0, R, P, N, BLOCK_P, BLOCK_N)


@triton.jit
def _partial_sums_kernel(src_a_ptr, a0_ptr, a1_ptr, a2_ptr, R_a, P_a, N_a, tiles_a,
                         src_b_ptr, b0_ptr, b1_ptr, b2_ptr, R_b, P_b, N_b, tiles_b,
                         src_c_ptr, c0_ptr, c1_ptr, c2_ptr, R_c, P_c, N_c,
                         BLOCK_P_A: tl.constexpr, BLOCK_N_A: tl.constexpr, BLOCK_P_B: tl.constexpr,
                         BLOCK_N_B: tl.constexpr, BLOCK_P_C: tl.constexpr, BLOCK_N_C: tl.constexpr):
    """Up to three jobs (grid: job a's tiles, then job b's, then job c's)."""
    tile = tl.program_id(0)
    if tile < tiles_a:
        _job_tile(tile, src_a_ptr, a0_ptr, a1_ptr, a2_ptr, R_a, P_a, N_a, BLOCK_P_A, BLOCK_N_A)
    elif tile < tiles_a + tiles_b:
        _job_tile(tile - tiles_a, src_b_ptr, b0_ptr, b1_ptr, b2_ptr, R_b, P_b, N_b, BLOCK_P_B, BLOCK_N_B)
    else:
        _job_tile(tile - tiles_a - tiles_b, src_c_ptr, c0_ptr, c1_ptr, c2_ptr, R_c, P_c, N_c, BLOCK_P_C, BLOCK_N_C)


def _check(src: torch.Tensor) -> None:
    if src.dim() != 4 or not src.is_contiguous():
        raise ValueError(f"partial sums need contiguous (S, R, P, N) sources, got {tuple(src.shape)}")
    if not 1 <= src.shape[0] <= 3:
        raise ValueError(f"a partial-sum source holds 1-3 slices, got {src.shape[0]}")


def _tiles(src: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_N, tiles) of a source: columns as wide as 256 while that leaves enough programs,
    then as many partials a step as fill a tile."""
    slices, rows, parts, cols = src.shape
    block_n = min(triton.next_power_of_2(max(cols, 1)), 256)
    while block_n > 32 and slices * rows * triton.cdiv(cols, block_n) < _TARGET_PROGRAMS:
        block_n //= 2
    block_p = max(1, min(triton.next_power_of_2(max(parts, 1)), _TILE_ELEMENTS // block_n))
    return block_p, block_n, slices * rows * triton.cdiv(cols, block_n)


def sum_partials(*sources: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """For each contiguous (S, R, P, N) source (S <= 3), its S slices summed over P: S new float32 (R, N)
    tensors of their own (custom ops may not return tensors that share storage). Up to three sources a
    launch."""
    for src in sources:
        _check(src)
    outs = [tuple(src.new_empty(src.shape[1], src.shape[3], dtype=torch.float32) for _ in range(src.shape[0]))
            for src in sources]
    for i in range(0, len(sources), 3):
        group = [(src, dst) for src, dst in zip(sources[i:i + 3], outs[i:i + 3])]
        sizes = [_tiles(src) for src, _ in group]
        total = sum(tiles for _, _, tiles in sizes)
        if total == 0:
            continue
        while len(group) < 3:  # absent jobs: the first again, with no tiles
            group.append(group[0])
            sizes.append((1, 32, 0))
        # three destinations a job: the first repeated where it has fewer slices (the kernel never writes those)
        a, b, c = ((src, *(dst + (dst[0],) * (3 - len(dst))), *src.shape[1:]) for src, dst in group)
        _partial_sums_kernel[(total,)](
            *a, sizes[0][2], *b, sizes[1][2], *c,
            BLOCK_P_A=sizes[0][0], BLOCK_N_A=sizes[0][1], BLOCK_P_B=sizes[1][0], BLOCK_N_B=sizes[1][1],
            BLOCK_P_C=sizes[2][0], BLOCK_N_C=sizes[2][1], num_warps=4,
        )
    return outs

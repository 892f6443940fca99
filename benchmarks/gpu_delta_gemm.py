"""The fused core's Δ GEMM (Δ_k = xp[..., k, :R] @ dt_proj_k^T for the K routes) at a model's stage shapes:
the Triton kernel (``delta_gemm``) over a few tile configurations against the ``torch.bmm`` it replaced
(with the permuted copy of xp it needed), as achieved GB/s against the measured copy bandwidth.

    PYTHONPATH=src python benchmarks/gpu_delta_gemm.py [--models vmamba_small_s2l15,vmamba_base_s2l15]

Bytes = xp's R columns read once, the weight read once, Δ written once.
"""

from __future__ import annotations

import argparse
import json

import torch
from cuda_timing import copy_bandwidth, timed

CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_C": 128, "num_warps": 4}, {"BLOCK_M": 128, "BLOCK_C": 128, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_C": 64, "num_warps": 4}, {"BLOCK_M": 64, "BLOCK_C": 64, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_C": 128, "num_warps": 8}, {"BLOCK_M": 64, "BLOCK_C": 256, "num_warps": 8},
]


def bmm_delta(xp, dt_weight, rank, dtype):
    """The replaced path: a route-major copy of xp's Δ columns, then cuBLAS."""
    dt_low = xp[..., :rank].permute(2, 0, 1, 3).reshape(xp.shape[2], -1, rank)
    return torch.bmm(dt_low, dt_weight.to(dtype).transpose(1, 2))


def measure(xp, weight, rank, dtype, nbytes, copy_gbs):
    """Times (ms) of the bmm path, of every Triton configuration and of the default; errors above 1e-2."""
    from vmamba.ops.triton.ss2d_core import delta_gemm

    expected = bmm_delta(xp, weight, rank, dtype).float()
    row = {"bmm_ms": timed(lambda: bmm_delta(xp, weight, rank, dtype))}
    best = None
    for cfg in CONFIGS:
        out = delta_gemm(xp, weight, rank, dtype, config=cfg).float()
        err = ((out - expected).norm() / expected.norm()).item()
        ms = timed(lambda cfg=cfg: delta_gemm(xp, weight, rank, dtype, config=cfg))
        row[f"triton_ms {cfg}"] = ms
        if err > 1e-2:
            row[f"error {cfg}"] = err
        if best is None or ms < best[0]:
            best = (ms, cfg)
    row["default_ms"] = timed(lambda: delta_gemm(xp, weight, rank, dtype))
    row["best"] = best
    for key, ms in (("bmm", row["bmm_ms"]), ("default", row["default_ms"]), ("best", best[0])):
        row[f"{key}_frac_copy"] = nbytes / ms / 1e6 / copy_gbs
    return row


def stage_shapes(name):
    import vmamba
    from vmamba.layers.ss2d import SS2D

    model = vmamba.create_model(name)
    for stage, layer in enumerate(model.layers):
        ss2d = next(m for m in layer.modules() if isinstance(m, SS2D))
        routes, channels, rank = ss2d.dt_projs_weight.shape
        yield stage + 1, 56 >> stage, routes, channels, rank, ss2d.x_proj_weight.shape[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vmamba_small_s2l15,vmamba_base_s2l15")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="gpu_delta_gemm.json")
    args = parser.parse_args()
    dtype = torch.bfloat16
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for name in args.models.split(","):
        for stage, size, routes, channels, rank, width in stage_shapes(name):
            xp = torch.randn(args.batch, size * size, routes, width, device="cuda", dtype=dtype)
            weight = torch.randn(routes, channels, rank, device="cuda")
            nbytes = 2 * (xp.shape[0] * xp.shape[1] * routes * (rank + channels)) + 2 * weight.numel()
            row = {"model": name, "stage": stage, "M": args.batch * size * size, "C": channels, "R": rank,
                   **measure(xp, weight, rank, dtype, nbytes, copy_gbs)}
            best = row["best"]
            rows.append(row)
            print(f"{name} s{stage} M={row['M']} C={channels} R={rank}: bmm {row['bmm_ms']:.3f} ms "
                  f"({row['bmm_frac_copy']:.0%}) | triton default {row['default_ms']:.3f} ms "
                  f"({row['default_frac_copy']:.0%}) | best {best[0]:.3f} ms {best[1]}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"copy_GBs": copy_gbs, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

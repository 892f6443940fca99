"""Launch the fused SS2D core kernels of one VMamba-T[s1l8] stage a few times, for Nsight Compute (CUDA).

    ncu --clock-control none -k regex:_core_ -c 2 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \\
        python benchmarks/gpu_ncu_core.py [stage] [model]

(``-c 2`` profiles the first forward and the first backward launch; the ncu table in BENCHMARKS.md,
session 4, came from this with stage 1.) ``model``: a registered name (default vmamba_tiny_s1l8;
vanilla_vmamba_tiny for d_state 16). Batch 128, bf16 maps, default launch configuration.
"""

from __future__ import annotations

import sys

import torch
from gpu_ss2d_sweep import stage_inputs


def main() -> None:
    import vmamba
    from vmamba.layers.ss2d import SS2D
    from vmamba.ops.triton import ss2d_core as kernels

    stage = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    model = vmamba.create_model(sys.argv[2] if len(sys.argv) > 2 else "vmamba_tiny_s1l8").cuda()
    ss2d = next(m for m in model.layers[stage - 1].modules() if isinstance(m, SS2D))
    size = 56 >> (stage - 1)
    u, xp, w, A, D, bias = stage_inputs(ss2d, 128, size, torch.bfloat16)
    args = (u, xp, w, A, D, bias, size, size, 2)
    grad = torch.randn(ss2d.routes, *u.shape, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        kernels.ss2d_scan_fwd(*args)
        kernels.ss2d_scan_bwd(grad, *args)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Launch the plain selective scan's kernels at one VMamba-T[s1l8] stage shape, for Nsight Compute (CUDA).

    ncu --clock-control none -k regex:_ss_ -c 2 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        --section MemoryWorkloadAnalysis --section InstructionStats \\
        python benchmarks/gpu_ncu_scan.py [stage] [dtype] [inference|training] [model]

``-c 2`` profiles the first forward (saving the backward's states, as the op does in training) and the
first backward launch; with ``inference``, forwards only, without saving states. ``model``: a key of
``gpu_scan.MODELS`` (default s1l8; ``vanilla`` for d_state 16). Batch 128, default launch
configurations, inputs as in ``gpu_scan.py``.
"""

from __future__ import annotations

import sys

import torch
from gpu_scan import BATCH, LENGTHS, MODELS, K, make_inputs

from vmamba.ops.triton.selective_scan import saved_states_shape, selective_scan_bwd, selective_scan_fwd


def main() -> None:
    stage = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.bfloat16
    dims, state = MODELS[sys.argv[4] if len(sys.argv) > 4 else "s1l8"]
    kc, length = K * dims[stage - 1], LENGTHS[stage - 1]
    ins = make_inputs(BATCH, kc, state, length, dtype, seed=stage)
    grad = torch.randn(BATCH, kc, length, device="cuda")
    states = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device="cuda")
    inference = len(sys.argv) > 3 and sys.argv[3] == "inference"
    for _ in range(2):
        if inference:
            selective_scan_fwd(*ins, True)
            continue
        selective_scan_fwd(*ins, True, states_out=states)
        selective_scan_bwd(grad, *ins, True, states=states)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

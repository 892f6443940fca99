"""The plain selective scan's forward + backward through the custom op, for backward variants.

Each variant (backward chunk length BLOCK_T, channels per warp BLOCK_D, (T, D) tiles FLAT, du / ddelta
stored in the input dtype or in float32 and cast afterwards, STAGES of Triton's pipeliner over the
backward's intervals) becomes the default
backward configuration in turn, so the forward saves the states at that variant's interval exactly as
in training. Rounds interleave the variants to spread drift.

    PYTHONPATH=src python benchmarks/gpu_scan_grad_dtype.py [--dtype bfloat16] [--stages 1,2,3]
        [--variants '[{"BLOCK_D": 32, "BLOCK_T": 8, "FLAT": 1}, {}]']
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_scan import BATCH, LENGTHS, MODELS, K, copy_bandwidth, make_inputs, op_fwd_bwd_ms, scan_bytes

import vmamba.ops.triton.selective_scan as scan_kernels

VARIANTS = {  # by input element size; {} is the current default (session 12: (T, D) tiles from L 512)
    2: [{},
        {"FLAT": 1, "BLOCK_D": 16, "BLOCK_T": 16, "HALF_GRADS": 1, "STAGES": 1},  # the default for L 512-2047
        {"FLAT": 0, "BLOCK_D": 16, "BLOCK_T": 16, "HALF_GRADS": 1, "STAGES": 1},  # session 11's at stage 1
        {"FLAT": 0, "BLOCK_D": 32, "BLOCK_T": 16, "HALF_GRADS": 1, "STAGES": 1}],  # session 11's at stage 2
    4: [{},
        {"FLAT": 1, "BLOCK_D": 16, "BLOCK_T": 16},  # the default for L 512-2047
        {"FLAT": 0, "BLOCK_D": 16, "BLOCK_T": 32},  # session 11's from L 512
        {"FLAT": 0, "BLOCK_D": 32, "BLOCK_T": 8}],  # session 10's; still the default below L 512
}


def with_backward_defaults(variant):
    """default_config whose backward configurations take ``variant``'s keys."""
    original = scan_kernels.default_config

    def patched(channels, state, backward=False, length=None, elem_size=4):
        cfg = original(channels, state, backward, length, elem_size)
        return {**cfg, **variant} if backward else cfg
    return original, patched


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="gpu_scan_grad_dtype.json")
    parser.add_argument("--graph", action="store_true",
                        help="time CUDA-graph replays of the op (no host overhead; stages 2-4 are host-bound)")
    parser.add_argument("--variants", help="JSON list of backward configurations, instead of VARIANTS")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    dims, n = MODELS["s1l8"]
    copy_gbs = copy_bandwidth()
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        kc, length = K * dims[stage - 1], LENGTHS[stage - 1]
        ins = make_inputs(BATCH, kc, n, length, dtype, seed=stage)
        gy = torch.randn(BATCH, kc, length, device="cuda")
        fbb = scan_bytes(BATCH, kc, n, length, dtype.itemsize, True)
        variants = json.loads(args.variants) if args.variants else VARIANTS[dtype.itemsize]
        times = {i: [] for i in range(len(variants))}
        for _ in range(args.rounds):
            for i, variant in enumerate(variants):
                original, patched = with_backward_defaults(variant)
                scan_kernels.default_config = patched
                try:
                    times[i].append(op_fwd_bwd_ms(ins, gy, graph=args.graph))
                finally:
                    scan_kernels.default_config = original
        for i, variant in enumerate(variants):
            ms = min(times[i])
            row = {"stage": stage, "dtype": args.dtype, "graph": args.graph, **variant, "op_fwd_bwd_ms": ms,
                   "rounds_ms": times[i],
                   "frac_copy": fbb / ms / 1e6 / copy_gbs}
            rows.append(row)
            print(f"s{stage} {args.dtype} {variant}: {ms:.3f} ms ({row['frac_copy']:.0%} of copy {copy_gbs:.0f} GB/s) "
                  f"rounds {[round(t, 3) for t in times[i]]}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"copy_GBs": copy_gbs, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""Forward + backward of the plain selective scan with and without the forward keeping the backward's states.

For each stage of vanilla VMamba-T (or, with --model s1l8, VMamba-T[s1l8]; batch 128, 224²) and dtype,
as CUDA-graph replays in interleaved rounds (best round kept):

- ``recomputing``: the inference forward, then the backward, whose first pass recomputes the states;
- ``saving``: the forward storing the states (``states_out``, its default configuration), then the
  backward reading them (what the op does at the d_states of ``SAVE_STATES_AT``);
- ``saving, 32 channels``: the same with the forward's LANES tiles at 32 channels a warp (the
  configuration before session 19; d_state 16 only).

Every variant's gradients are checked against ``recomputing``.

    PYTHONPATH=src python benchmarks/gpu_scan_saved_states.py --stages 1,2,3,4 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from gpu_scan import BATCH, LENGTHS, MODELS, K, copy_bandwidth, make_inputs, rel
from triton.testing import do_bench_cudagraph

from vmamba.ops.triton.selective_scan import saved_states_shape, selective_scan_bwd, selective_scan_fwd


def variants(ins, gy, states) -> dict:
    """Name -> a closure running one forward + backward."""

    def recomputing():
        selective_scan_fwd(*ins, True)
        return selective_scan_bwd(gy, *ins, True)

    def saving(config=None):
        def run():
            selective_scan_fwd(*ins, True, states_out=states, config=config)
            return selective_scan_bwd(gy, *ins, True, states=states)
        return run

    out = {"recomputing": recomputing, "saving": saving()}
    if ins[2].shape[1] == 16:
        out["saving, 32 channels"] = saving({"BLOCK_D": 32})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vanilla", choices=sorted(MODELS))
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="gpu_scan_saved_states.json")
    args = parser.parse_args()
    dims, state = MODELS[args.model]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "batch": BATCH, "model": args.model, "copy_GBs": copy_bandwidth(),
              "protocol": "do_bench_cudagraph median of 100 ms of replays; best of the rounds", "rows": []}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for stage in map(int, args.stages.split(",")):
            kc, length = K * dims[stage - 1], LENGTHS[stage - 1]
            ins = make_inputs(BATCH, kc, state, length, dtype, seed=stage)
            gy = torch.randn(BATCH, kc, length, device="cuda")
            states = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device="cuda")
            runs = variants(ins, gy, states)
            reference = runs["recomputing"]()
            errors = {name: max(rel(a, b) for a, b in zip(run(), reference) if a is not None)
                      for name, run in runs.items()}
            times: dict = {}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    times.setdefault(name, []).append(do_bench_cudagraph(run, rep=100, return_mode="median"))
            for name in runs:
                row = {"stage": stage, "dtype": dtype_name, "variant": name, "ms": min(times[name]),
                       "ms_per_round": times[name], "rel_diff_to_recomputing": errors[name]}
                result["rows"].append(row)
                print(f"s{stage} {dtype_name:8s} {name:22s} {row['ms']:.3f} ms "
                      f"(rel diff {errors[name]:.1e})", flush=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

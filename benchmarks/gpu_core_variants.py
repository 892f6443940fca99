"""The fused SS2D core's kernels for configuration variants, side by side, as CUDA-graph replays.

For each stage of a VMamba model (batch 128, 224², bf16): the inference forward, the training forward
(keeping the backward's states) and the backward from those states, for every variant given
(configuration overrides of the default; {} is the default itself), in interleaved rounds. Each
variant's outputs are compared with the default's first (largest absolute difference of y and of the
states; the gradients' largest relative difference in norm).

    PYTHONPATH=src python benchmarks/gpu_core_variants.py --model vanilla_vmamba_tiny --stages 1,3 \
        --fwd '[{}, {"maxnreg": 128}]' --bwd '[{}, {"BLOCK_T": 4}]'
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from gpu_scan import rel
from gpu_scan_variants import graph_ms
from gpu_ss2d_sweep import stage_inputs


def time_stage(ss2d, size: int, fwd_variants: list, bwd_variants: list, rounds: int) -> dict:
    from vmamba.ops.triton import ss2d_core as k

    u, xp, w, A, D, bias = stage_inputs(ss2d, 128, size, torch.bfloat16)
    args = (u, xp, w, A, D, bias, size, size, 2)
    gy = torch.randn(ss2d.routes, *u.shape, device="cuda", dtype=torch.bfloat16)
    y_ref, states = k.ss2d_scan_fwd(*args, save_states=True)
    grads_ref = k.ss2d_scan_bwd(gy, *args, states=states)
    diffs = {}
    for i, cfg in enumerate(fwd_variants):
        y, kept = k.ss2d_scan_fwd(*args, config=cfg, save_states=True)
        diffs["fwd", i] = {"y_abs": (y.float() - y_ref.float()).abs().max().item(),
                           "states_abs": (kept - states).abs().max().item()}
    for i, cfg in enumerate(bwd_variants):
        grads = k.ss2d_scan_bwd(gy, *args, config=cfg, states=states)
        diffs["bwd", i] = {"grads_rel": max(rel(a, b) for a, b in zip(grads, grads_ref) if a is not None)}
    times: dict = {}
    for _ in range(rounds):
        for i, cfg in enumerate(fwd_variants):
            times.setdefault(("inference", i), []).append(graph_ms(lambda cfg=cfg: k.ss2d_scan_fwd(*args, config=cfg)))
            times.setdefault(("training", i), []).append(
                graph_ms(lambda cfg=cfg: k.ss2d_scan_fwd(*args, config=cfg, save_states=True)))
        for i, cfg in enumerate(bwd_variants):
            times.setdefault(("backward", i), []).append(
                graph_ms(lambda cfg=cfg: k.ss2d_scan_bwd(gy, *args, config=cfg, states=states)))
    return {"times": times, "diffs": diffs}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--fwd", default="[]", help="JSON list of forward configuration overrides")
    parser.add_argument("--bwd", default="[]", help="JSON list of backward configuration overrides")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="gpu_core_variants.json")
    args = parser.parse_args()
    import triton

    import vmamba
    from vmamba.layers.ss2d import SS2D

    fwd_variants, bwd_variants = json.loads(args.fwd), json.loads(args.bwd)
    model = vmamba.create_model(args.model).cuda()
    rows = []
    for stage, layer in enumerate(model.layers):
        if str(stage + 1) not in args.stages.split(","):
            continue
        ss2d = next(m for m in layer.modules() if isinstance(m, SS2D))
        result = time_stage(ss2d, 56 >> stage, fwd_variants, bwd_variants, args.rounds)
        for (kind, i), ms in sorted(result["times"].items()):
            cfg = (bwd_variants if kind == "backward" else fwd_variants)[i]
            diff = result["diffs"]["bwd" if kind == "backward" else "fwd", i]
            rows.append({"stage": stage + 1, "kind": kind, "config": cfg, "ms": min(ms), "ms_per_round": ms, **diff})
            print(f"s{stage + 1} {kind:9s} {json.dumps(cfg):50s} {min(ms):.4f} ms "
                  f"(rounds {', '.join(f'{m:.4f}' for m in ms)}) {json.dumps(diff)}", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "model": args.model, "batch": 128,
            "dtype": "bfloat16", "timing": "do_bench_cudagraph median of 100 ms, best of the rounds"}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

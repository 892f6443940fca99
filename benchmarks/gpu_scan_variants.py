# ruff: noqa: B023  (closures are timed immediately, inside the loop iteration)
"""The plain selective scan's kernels for configuration variants, side by side, as CUDA-graph replays.

For each stage of VMamba-T[s1l8] (or, with --model vanilla, vanilla VMamba-T; batch 128, 224²) and
dtype: the inference forward, the training forward (keeping the backward's states) and the backward
from those states, each for every variant given (configuration overrides of the default; {} is the
default itself), in interleaved rounds. Graph replays leave the host out, which at stages 3-4 would
otherwise take longer than the kernels. Each variant's outputs are checked against the default's.

    PYTHONPATH=src python benchmarks/gpu_scan_variants.py --stages 3,4 --dtypes bfloat16,float32 \
        --fwd '[{}, {"PERSIST": 8, "STAGES": 3}]' --bwd '[{}, {"PERSIST": 8, "STAGES": 2}]'
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from gpu_scan import BATCH, LENGTHS, MODELS, K, copy_bandwidth, make_inputs, rel, scan_bytes
from triton.testing import do_bench_cudagraph

from vmamba.ops.triton.selective_scan import saved_states_shape, selective_scan_bwd, selective_scan_fwd


def graph_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def states_for(cfg: dict, ins, default_states: torch.Tensor) -> torch.Tensor | None:
    """The states a backward variant reads: the default's where its intervals are the default's, none
    where it takes whole rows (STEPS), zeros where one interval spans the whole sequence (the state
    entering it is 0)."""
    shape = saved_states_shape(ins[0], ins[2], ins[3], config=cfg)
    if shape == tuple(default_states.shape):
        return default_states
    if shape[1] == 0:
        return None
    if shape[1] == 1:
        return torch.zeros(shape, device=default_states.device)
    raise ValueError(f"backward variant {cfg} keeps states of shape {shape}, not the default's")


def time_stage(stage: int, dtype: torch.dtype, fwd_variants: list, bwd_variants: list, rounds: int,
               copy_gbs: float, model: str = "s1l8", length: int | None = None) -> list[dict]:
    dims, n = MODELS[model]
    kc, length = K * dims[stage - 1], length or LENGTHS[stage - 1]
    ins = make_inputs(BATCH, kc, n, length, dtype, seed=stage)
    gy = torch.randn(BATCH, kc, length, device="cuda")
    states = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device="cuda")
    y_ref = selective_scan_fwd(*ins, True)
    selective_scan_fwd(*ins, True, states_out=states)
    g_ref = selective_scan_bwd(gy, *ins, True, states=states, deterministic=True)
    ok = {}
    for i, cfg in enumerate(fwd_variants):
        kept = torch.empty_like(states)
        err = max(rel(selective_scan_fwd(*ins, True, config=cfg), y_ref),
                  rel(selective_scan_fwd(*ins, True, config=cfg, states_out=kept), y_ref), rel(kept, states))
        ok["fwd", i] = err < 1e-5
        print(f"  s{stage} {dtype} fwd {cfg}: rel diff to default {err:.1e}", flush=True)
    bwd_states = [states_for(cfg, ins, states) for cfg in bwd_variants]
    for i, cfg in enumerate(bwd_variants):
        grads = selective_scan_bwd(gy, *ins, True, states=bwd_states[i], deterministic=True, config=cfg)
        err = max(rel(a, b) for a, b in zip(grads, g_ref) if a is not None)
        ok["bwd", i] = err < (1e-2 if ins[0].element_size() == 2 else 1e-5)
        print(f"  s{stage} {dtype} bwd {cfg}: rel diff to default {err:.1e}", flush=True)
    times: dict = {}
    for _ in range(rounds):
        for i, cfg in enumerate(fwd_variants):
            times.setdefault(("inference", i), []).append(graph_ms(lambda: selective_scan_fwd(*ins, True, config=cfg)))
            times.setdefault(("training", i), []).append(
                graph_ms(lambda: selective_scan_fwd(*ins, True, config=cfg, states_out=states)))
        for i, cfg in enumerate(bwd_variants):
            times.setdefault(("backward", i), []).append(
                graph_ms(lambda: selective_scan_bwd(gy, *ins, True, states=bwd_states[i], config=cfg)))
    ib = ins[0].element_size()
    fwd_bytes, all_bytes = scan_bytes(BATCH, kc, n, length, ib, False), scan_bytes(BATCH, kc, n, length, ib, True)
    rows = []
    for (kind, i), ms in sorted(times.items()):
        cfg = (bwd_variants if kind == "backward" else fwd_variants)[i]
        best = min(ms)
        frac = fwd_bytes / best / 1e6 / copy_gbs if kind == "inference" else None
        rows.append({"stage": stage, "dtype": str(dtype).removeprefix("torch."), "kind": kind, "config": cfg,
                     "ms_per_round": ms, "ms": best, "frac_copy_inference": frac,
                     "matches_default": ok["bwd" if kind == "backward" else "fwd", i]})
        print(f"s{stage} {rows[-1]['dtype']:8s} {kind:9s} {json.dumps(cfg):60s} {best:.4f} ms "
              f"(rounds {', '.join(f'{m:.4f}' for m in ms)})" + (f" {frac:.0%} of copy" if frac else ""), flush=True)
    train = {i: min(times["training", i]) for i in range(len(fwd_variants))}
    back = {i: min(times["backward", i]) for i in range(len(bwd_variants))}
    for i, j in ((i, j) for i in train for j in back):
        total = train[i] + back[j]
        print(f"s{stage} {rows[-1]['dtype']:8s} fwd {i} + bwd {j}: {total:.4f} ms, "
              f"{all_bytes / total / 1e6 / copy_gbs:.0%} of copy", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="s1l8", choices=sorted(MODELS), help="stage shapes (d_inner, d_state)")
    parser.add_argument("--stages", default="3,4")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--fwd", default="[{}]", help="JSON list of forward configuration overrides")
    parser.add_argument("--bwd", default="[{}]", help="JSON list of backward configuration overrides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=None,
                        help="sequence length instead of the stage's (e.g. 64: stage 4 at 256x256)")
    parser.add_argument("--out", default="gpu_scan_variants.json")
    args = parser.parse_args()
    fwd_variants, bwd_variants = json.loads(args.fwd), json.loads(args.bwd)
    copy_gbs = copy_bandwidth()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "batch": BATCH, "model": args.model, "length": args.length, "copy_GBs": copy_gbs,
               "protocol": "do_bench_cudagraph median of 100 ms of replays; best of the rounds", "rows": []}
    print(f"{results['gpu']} torch {torch.__version__} triton {triton.__version__}: copy {copy_gbs:.0f} GB/s",
          flush=True)
    for stage in (int(s) for s in args.stages.split(",")):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            results["rows"] += time_stage(stage, dtype, fwd_variants, bwd_variants, args.rounds, copy_gbs,
                                          args.model, args.length)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

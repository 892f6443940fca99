"""Block-size sweep of the fused SS2D core kernels at the stage shapes of a VMamba model (CUDA).

    PYTHONPATH=src python benchmarks/gpu_ss2d_sweep.py [--model vmamba_tiny_s1l8] [--dtype bfloat16]

For every stage: forward and backward kernel time per configuration (BLOCK_D, BLOCK_T, num_warps,
PREFETCH, maxnreg, and for the forward DELTA_GEMM: Δ from one batched GEMM, timed with the GEMM), the
default configuration's time, the default training pair (forward saving its chunk states, backward
using them) and the four best. Used to set ``core_config``. For d_state > 2 (vanilla models) it
times the default backward with and without FLIP and against the LANES backward, and the default
forward against the LANES forward (one channel and all its states per lane) over chunk length,
channels per program and DELTA_GEMM.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from cuda_timing import timed


def stage_inputs(ss2d, batch, size, dtype):
    from vmamba.ops.ss2d_core import _projections

    x = torch.randn(batch, size, size, ss2d.d_inner, device="cuda", dtype=dtype)
    u, xp = _projections(x, ss2d.x_proj_weight.detach())
    A, D, bias = (t.detach().contiguous() for t in ss2d._scan_parameters(0, ss2d.routes))
    return u, xp, ss2d.dt_projs_weight.detach(), A, D, bias


FORWARD = [  # the short list, from the session-3 and session-4 sweeps
    dict(BLOCK_D=32, BLOCK_T=8, num_warps=1, PREFETCH=1), dict(BLOCK_D=64, BLOCK_T=8, num_warps=1, PREFETCH=1),
    dict(BLOCK_D=32, BLOCK_T=8, num_warps=1, PREFETCH=0), dict(BLOCK_D=64, BLOCK_T=4, num_warps=1, PREFETCH=1),
    dict(BLOCK_D=32, BLOCK_T=8, num_warps=1, PREFETCH=1, maxnreg=128),
    dict(BLOCK_D=64, BLOCK_T=8, num_warps=1, PREFETCH=1, maxnreg=128),
    # longer chunks (the plain scan's fp32 forward gained 11 % from 8 to 32 steps; session 9)
    dict(BLOCK_D=32, BLOCK_T=16, num_warps=1, PREFETCH=1), dict(BLOCK_D=32, BLOCK_T=32, num_warps=1, PREFETCH=1),
    # Triton's pipeliner (STAGES; untimed in the core when added, session 9: in bf16 its pixel gathers of
    # 2-byte elements compile to plain loads, not asynchronous copies; in fp32 they do)
    dict(BLOCK_D=32, BLOCK_T=32, num_warps=1, PREFETCH=0, STAGES=3), dict(BLOCK_D=32, BLOCK_T=8, num_warps=1,
                                                                        PREFETCH=0, STAGES=3),
    # around session 10's d_state-1 default at small rank (32-step chunks, STAGES 3)
    dict(BLOCK_D=32, BLOCK_T=64, num_warps=1, PREFETCH=0, STAGES=3), dict(BLOCK_D=32, BLOCK_T=32, num_warps=1,
                                                                        PREFETCH=0, STAGES=2),
    dict(BLOCK_D=32, BLOCK_T=16, num_warps=1, PREFETCH=0, STAGES=3), dict(BLOCK_D=64, BLOCK_T=16, num_warps=1,
                                                                        PREFETCH=0, STAGES=3),
    dict(BLOCK_D=64, BLOCK_T=32, num_warps=1, PREFETCH=0, STAGES=3)]
BACKWARD = [
    dict(BLOCK_D=32, BLOCK_T=4, num_warps=1), dict(BLOCK_D=32, BLOCK_T=8, num_warps=1),
    dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=128), dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=96),
    dict(BLOCK_D=32, BLOCK_T=2, num_warps=1), dict(BLOCK_D=64, BLOCK_T=4, num_warps=2),
    dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=128, FLIP=1), dict(BLOCK_D=32, BLOCK_T=8, num_warps=1, FLIP=1),
    # register caps below 128 (more warps per SM for the latency-bound backward; session 7)
    *(dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=cap, FLIP=1) for cap in (104, 96, 80, 72, 64)),
    dict(BLOCK_D=64, BLOCK_T=4, num_warps=2, maxnreg=96, FLIP=1),
    # the next chunk's loads in flight during the current one (PREFETCH; untimed when added, session 7)
    *(dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=cap, FLIP=1, PREFETCH=1) for cap in (128, 104, 96, 80)),
    # Triton's pipeliner instead of the hand-written prefetch (untimed when added, session 9)
    dict(BLOCK_D=32, BLOCK_T=4, num_warps=1, maxnreg=128, FLIP=1, PREFETCH=0, STAGES=3),
    # 16 channels per warp, twice the programs (the plain scan's backward gained 5 % in bf16 and, with
    # 32-step chunks, 16 % in fp32; in the core, session 11 call 8: stage 1 2.131 against 1.671 ms)
    dict(BLOCK_D=16, BLOCK_T=4, num_warps=1, maxnreg=128, FLIP=1, PREFETCH=1),
    dict(BLOCK_D=16, BLOCK_T=4, num_warps=1, FLIP=1, PREFETCH=1)]


def configs(state, full, kinds=("fwd", "bwd")):
    """Forward configurations (each with and without DELTA_GEMM), then backward ones (of ``kinds``)."""
    if full:
        grid = itertools.product((16, 32, 64), (8, 16, 32), (1, 2), (0, 1), (0, 1))
        for block_d, block_t, warps, prefetch, delta_gemm in grid:
            yield {"BLOCK_D": block_d, "BLOCK_T": block_t, "num_warps": warps, "PREFETCH": prefetch,
                   "DELTA_GEMM": delta_gemm, "forward": True, "backward": not prefetch and not delta_gemm}
        return
    for cfg in FORWARD if "fwd" in kinds else ():
        for delta_gemm in (0, 1):
            yield {**cfg, "DELTA_GEMM": delta_gemm, "forward": True, "backward": False}
    for cfg in BACKWARD if "bwd" in kinds else ():
        yield {**cfg, "forward": False, "backward": True}


def sweep_stage(ss2d, batch, size, dtype, full=False, kinds=("fwd", "bwd"), where=None):
    from vmamba.ops.triton import ss2d_core as k

    u, xp, w, A, D, bias = stage_inputs(ss2d, batch, size, dtype)
    args = (u, xp, w, A, D, bias, size, size, 2)
    gy = torch.randn(ss2d.routes, *u.shape, device="cuda", dtype=dtype)
    results = {"fwd": [], "bwd": [], "fwd_saving_states": []}
    candidates = [cfg for cfg in configs(ss2d.d_state, full, kinds)
                  if all(cfg.get(key) == value for key, value in (where or {}).items())]
    if ss2d.d_state > 2:  # the short list is tuned for d_state 1
        base = k.core_config(u.shape[-1], ss2d.d_state, w.shape[2], True, size * size, u.element_size())
        # the backward with one channel and all its states per lane (LANES), chunks inside the state interval,
        # the adjoint flipped or in reverse, dB / dC summed by butterflies or by halving (session 17)
        candidates = [{**base, "LANES": 1, "BLOCK_D": 32, "BLOCK_T": block_t, "num_warps": 1, "FLIP": flip,
                       "HALVING": halving, "forward": False, "backward": True}
                      for block_t, flip, halving in itertools.product((2, 4), (0, 1), (0, 1))]
        if "bwd" not in kinds:
            candidates = []
        # the forward with one channel and all its states per lane (LANES), against the default
        fwd = k.core_config(u.shape[-1], ss2d.d_state, w.shape[2], False, size * size, u.element_size())
        forwards = [{**fwd, "forward": True, "backward": False},
                    {**fwd, "DELTA_GEMM": 1, "forward": True, "backward": False}]  # Δ not per state lane
        for block_d, block_t, delta_gemm in itertools.product((32, 64), (2, 4), (0, 1)):
            forwards.append({"LANES": 1, "BLOCK_D": block_d, "BLOCK_T": block_t, "num_warps": block_d // 32,
                             "PREFETCH": 1, "DELTA_GEMM": delta_gemm, "forward": True, "backward": False})
        candidates += forwards if "fwd" in kinds else []
    for cfg in candidates:
        if cfg["BLOCK_D"] * ss2d.d_state * cfg["BLOCK_T"] < 32 * cfg["num_warps"]:  # idle lanes
            continue
        try:
            if cfg["forward"]:
                ms = timed(lambda cfg=cfg: k.ss2d_scan_fwd(*args, config=cfg))
                results["fwd"].append((ms, cfg))
                if ss2d.d_state <= 2:  # the training forward: the same kernel also storing the chunk states
                    ms = timed(lambda cfg=cfg: k.ss2d_scan_fwd(*args, config=cfg, save_states=True))
                    results["fwd_saving_states"].append((ms, cfg))
            if cfg["backward"]:
                ms = timed(lambda cfg=cfg: k.ss2d_scan_bwd(gy, *args, config=cfg))
                results["bwd"].append((ms, cfg))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is skipped
            print("skip", cfg, type(exc).__name__, str(exc)[:100], flush=True)
    _, states = k.ss2d_scan_fwd(*args, save_states=True)
    default = {"fwd": timed(lambda: k.ss2d_scan_fwd(*args)), "bwd": timed(lambda: k.ss2d_scan_bwd(gy, *args)),
               "fwd_saving_states": timed(lambda: k.ss2d_scan_fwd(*args, save_states=True))}
    out = {name: {"default_ms": default[name], "best": sorted(rows, key=lambda r: r[0])[:4]}
           for name, rows in results.items()}
    # training pair: the backward using the forward's saved states
    out["bwd"]["default_with_saved_states_ms"] = timed(lambda: k.ss2d_scan_bwd(gy, *args, states=states))
    lanes = [cfg for cfg in candidates if cfg.get("LANES") and cfg["backward"]]
    out["bwd"]["lanes_with_saved_states_ms"] = [
        (timed(lambda cfg=cfg: k.ss2d_scan_bwd(gy, *args, config=cfg, states=states)), cfg) for cfg in lanes]
    if ss2d.d_state <= 2:  # the training path: every backward candidate with the forward's saved states
        saved = [(timed(lambda cfg=cfg: k.ss2d_scan_bwd(gy, *args, config=cfg, states=states)), cfg)
                 for cfg in candidates if cfg["backward"] and cfg["BLOCK_T"] == 4]
        out["bwd"]["with_saved_states_ms"] = sorted(saved, key=lambda r: r[0])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--out", default="gpu_ss2d_sweep.json")
    parser.add_argument("--full", action="store_true", help="the full grid instead of the short list")
    parser.add_argument("--kinds", default="fwd,bwd", help="which kernels of the short list to sweep")
    parser.add_argument("--where", default="", help="only candidates with these integer keys, e.g. BLOCK_D=16")
    args = parser.parse_args()
    where = {key: int(value) for key, value in (item.split("=") for item in args.where.split(",") if item)}
    import vmamba
    from vmamba.layers.ss2d import SS2D

    model = vmamba.create_model(args.model).cuda()
    dtype = getattr(torch, args.dtype)
    out = {}
    for stage, layer in enumerate(model.layers):
        if str(stage + 1) not in args.stages.split(","):
            continue
        ss2d = next(m for m in layer.modules() if isinstance(m, SS2D))
        size = 56 >> stage
        out[stage + 1] = sweep_stage(ss2d, args.batch, size, dtype, args.full, tuple(args.kinds.split(",")), where)
        print(stage + 1, json.dumps(out[stage + 1]), flush=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

# ruff: noqa: B023  (closures are timed immediately, inside the loop iteration)
"""GPU check and benchmark of the Triton selective scan and cross scan/merge (run on a CUDA device).

    PYTHONPATH=src python benchmarks/gpu_scan.py [--out results.json] [--quick]

1. Copy bandwidth: a large device-to-device copy (bytes read + written), the ceiling.
2. Correctness at full VMamba shapes: triton vs the torch backend (forward and every gradient),
   and triton vs the float64 reference at a reduced batch.
3. Selective scan at the stage shapes of VMamba-T[s1l8] and vanilla VMamba-T (batch 128, 224x224),
   fp32 and bf16 inputs: forward and forward+backward time, achieved GB/s counting each input read
   once and each output written once, and the fraction of the copy bandwidth. A few block configs
   are swept at the stage-1 shape of each model; the best is used for every stage. Also, at the
   default configs, forward+backward with the forward keeping the backward's states (``states_out``).
4. cross_scan / cross_merge (triton vs torch) at the stage shapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import traceback

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import vmamba.ops.triton.cross_scan as triton_cross
from vmamba.ops.cross_scan import cross_merge, cross_scan
from vmamba.ops.selective_scan import selective_scan
from vmamba.ops.selective_scan_ref import selective_scan_reference
from vmamba.ops.selective_scan_torch import selective_scan_torch_bwd, selective_scan_torch_fwd
from vmamba.ops.triton.cross_scan import cross_merge_triton, cross_scan_triton
from vmamba.ops.triton.selective_scan import (
    default_config,
    saved_states_shape,
    selective_scan_bwd,
    selective_scan_fwd,
)

BATCH = 128
DEVICE = "cuda"
K = 4
MODELS = {
    # name: (d_inner per stage, d_state)
    "s1l8": ([96, 192, 384, 768], 1),
    "vanilla": ([192, 384, 768, 1536], 16),
}
LENGTHS = [56 * 56, 28 * 28, 14 * 14, 7 * 7]
SWEEP = {  # configurations as overrides of default_config (keys it leaves out take their defaults);
    # the default first; earlier sweeps' losers (BENCHMARKS.md) dropped. Session 11 lost with register caps
    # of 168 / 128 (one wave at stage 1, but spills), 2 or 4 stages, 16 or 8 channels per warp, 128 steps;
    # session 12 with a cap of 200, 16-step chunks (3, 4 or 6 stages), 32-step ones without the pipeliner,
    # (T, D) tiles (16 or 32 channels per warp) and u / delta staged as pieces of 16-64 bytes per channel.
    # ROW_ALIGN only changes kernels where L is not a multiple of 16 (--sweep-stages 3)
    ("fwd", 1): [{}, {"BLOCK_T": 32}, {"ROW_ALIGN": 0}, {"ROW_ALIGN": 1}],
    ("fwd", 16): [{"BLOCK_D": 8, "BLOCK_T": 32, "num_warps": 4, "PREFETCH": 0, "LANES": 0},
                  {"BLOCK_D": 8, "BLOCK_T": 16, "num_warps": 4, "PREFETCH": 1, "LANES": 0},
                  {"BLOCK_D": 16, "BLOCK_T": 16, "num_warps": 8, "PREFETCH": 0, "LANES": 0},
                  {"BLOCK_D": 32, "BLOCK_T": 4, "num_warps": 1, "PREFETCH": 1, "LANES": 1},
                  {"BLOCK_D": 64, "BLOCK_T": 4, "num_warps": 2, "PREFETCH": 1, "LANES": 1},
                  {"BLOCK_D": 32, "BLOCK_T": 8, "num_warps": 1, "PREFETCH": 1, "LANES": 1},
                  {"BLOCK_D": 128, "BLOCK_T": 4, "num_warps": 4, "PREFETCH": 1, "LANES": 1}],
    # the long-sequence default first ((T, D) tiles, 16 channels per warp in 32-step chunks); then the
    # session-11 defaults ((T, D, N) tiles) and session 10's
    ("bwd", 1): [{}, {"FLAT": 1, "BLOCK_D": 16, "BLOCK_T": 16},
                 {"FLAT": 0, "BLOCK_D": 16, "BLOCK_T": 16}, {"FLAT": 0, "BLOCK_D": 16, "BLOCK_T": 32},
                 {"FLAT": 0, "BLOCK_D": 32, "BLOCK_T": 16, "STAGES": 3}, {"ROW_ALIGN": 0}, {"ROW_ALIGN": 1}],
    ("bwd", 16): [{"BLOCK_D": 8, "BLOCK_T": 16, "num_warps": 4, "LANES": 0},
                  {"BLOCK_D": 16, "BLOCK_T": 8, "num_warps": 8, "LANES": 0},
                  {"BLOCK_D": 32, "BLOCK_T": 2, "num_warps": 1, "LANES": 1, "FLIP": 1},
                  {"BLOCK_D": 32, "BLOCK_T": 4, "num_warps": 1, "LANES": 1, "FLIP": 1},
                  {"BLOCK_D": 32, "BLOCK_T": 2, "num_warps": 1, "LANES": 1, "FLIP": 0}],
}
CROSS_SWEEP = [None, (4, 32, 32, 4), (16, 16, 16, 4), (16, 32, 32, 8), (32, 16, 16, 8)]  # None: default


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch, kc, n, length, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE

    def r(*s):
        return torch.randn(*s, device=dev, generator=g)

    u = r(batch, kc, length).to(dtype)
    delta = (0.5 * r(batch, kc, length)).to(dtype)
    A = -torch.exp(0.5 * r(kc, n)).float()
    B = r(batch, K, n, length).to(dtype)
    C = r(batch, K, n, length).to(dtype)
    D = r(kc).float()
    bias = (-3.0 + 0.5 * r(kc)).float()  # softplus(bias) ~ 0.05: the published dt init range
    return u, delta, A, B, C, D, bias


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=150, grad_to_none=grad_to_none, return_mode="median")


def op_fwd_bwd_ms(ins, gy, graph=False):
    """Forward + backward through the public op (custom op, saved states, gradient casts), ms; ``graph``:
    replays of a CUDA graph of it, without the host's time."""
    leaves = [x.detach().requires_grad_() for x in ins]

    def step():
        selective_scan(*leaves, delta_softplus=True, backend="triton").backward(gy)

    if graph:
        return do_bench_cudagraph(step, rep=100, grad_to_none=leaves, return_mode="median")
    return bench(step, grad_to_none=leaves)


def copy_bandwidth():
    x = torch.empty(2 * 1024**3 // 4, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s


def scan_bytes(batch, kc, n, length, in_bytes, backward):
    seq = batch * kc * length
    bc = batch * K * n * length
    fwd = (2 * seq + 2 * bc) * in_bytes + seq * 4  # u, delta, B, C read; y (fp32) written
    if not backward:
        return fwd
    # backward: gy (fp32), u, delta, B, C read; du, ddelta, dB, dC written at the input dtype
    return fwd + seq * 4 + (2 * seq + 2 * bc) * in_bytes + (2 * seq + 2 * bc) * in_bytes


def check_correctness(results):
    print("== correctness: triton vs torch backend at full shapes (fp32), triton vs float64 reference", flush=True)
    for model, (dims, n) in MODELS.items():
        for stage, (di, length) in enumerate(zip(dims, LENGTHS)):
            kc = K * di
            ins = make_inputs(BATCH, kc, n, length, torch.float32, seed=stage)
            y_t = selective_scan_fwd(*ins, True)
            y_r = selective_scan_torch_fwd(*ins, True)
            gy = torch.randn_like(y_t)
            g_t = selective_scan_bwd(gy, *ins, True)
            g_r = selective_scan_torch_bwd(gy, *ins, True)
            errs = [rel(y_t, y_r)] + [rel(a, b) for a, b in zip(g_t, g_r)]
            torch.cuda.synchronize()
            del g_r, y_r
            # deterministic path reproducible
            g_d1 = selective_scan_bwd(gy, *ins, True, deterministic=True)
            g_d2 = selective_scan_bwd(gy, *ins, True, deterministic=True)
            det_equal = all(torch.equal(a, b) for a, b in zip(g_d1, g_d2))
            det_err = max(rel(a, b) for a, b in zip(g_d1, g_t))
            del g_d1, g_d2, g_t
            row = {"model": model, "stage": stage + 1, "KC": kc, "N": n, "L": length,
                   "rel_err_vs_torch[y,du,ddelta,dA,dB,dC,dD,dbias]": errs,
                   "deterministic_reproducible": det_equal, "deterministic_vs_atomic": det_err}
            print(f"{model} stage{stage + 1} KC={kc} N={n} L={length}: max rel err {max(errs):.2e} "
                  f"({', '.join(f'{e:.1e}' for e in errs)}); deterministic equal={det_equal} "
                  f"vs atomic {det_err:.1e}", flush=True)
            results["correctness"].append(row)
            torch.cuda.empty_cache()
        # float64 reference at batch 2, stage 1 length, bf16 and fp32 inputs
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ins = make_inputs(2, K * dims[0], n, LENGTHS[0], dtype, seed=7)
            xs = [x.detach().double().requires_grad_() for x in ins]
            y_ref = selective_scan_reference(*xs, True)
            gy = torch.randn_like(y_ref)
            y_ref.backward(gy)
            y_t = selective_scan_fwd(*ins, True)
            g_t = selective_scan_bwd(gy.float(), *ins, True)
            errs = [rel(y_t, y_ref)] + [rel(a, x.grad) for a, x in zip(g_t, xs)]
            print(f"{model} vs float64 reference, {dtype}, batch 2, L={LENGTHS[0]}: max rel err {max(errs):.2e}",
                  flush=True)
            results["reference"].append({"model": model, "dtype": str(dtype), "errs": errs})


def sweep(kind, n, ins, gy):
    best = None
    ref = selective_scan_fwd(*ins, True) if kind == "fwd" else selective_scan_bwd(gy, *ins, True)
    u, B = ins[0], ins[3]
    default = default_config(u.shape[1] // B.shape[1], n, kind == "bwd", u.shape[-1], u.element_size())
    timed = set()
    for cfg in SWEEP[(kind, n)]:
        merged = tuple(sorted({**default, **cfg}.items()))
        if merged in timed:  # e.g. a ROW_ALIGN value the default already has at this dtype
            continue
        timed.add(merged)
        try:
            if kind == "fwd":
                ms = bench(lambda: selective_scan_fwd(*ins, True, config=cfg))
            else:
                ms = bench(lambda: selective_scan_bwd(gy, *ins, True, config=cfg))
        except Exception as exc:  # noqa: BLE001 - report and continue
            print(f"  config {cfg} failed: {type(exc).__name__}: {exc}"[:300], flush=True)
            continue
        out = selective_scan_fwd(*ins, True, config=cfg) if kind == "fwd" else selective_scan_bwd(gy, *ins, True,
                                                                                                    config=cfg)
        err = rel(out, ref) if kind == "fwd" else max(rel(a, b) for a, b in zip(out, ref) if a is not None)
        print(f"  sweep {kind} N={n} {cfg}: {ms:.3f} ms (rel diff to default config {err:.1e})", flush=True)
        # 2-byte inputs: du / ddelta may be stored rounded to their dtype (2^-9 relative for bf16)
        if not err < (1e-2 if kind == "bwd" and ins[0].element_size() == 2 else 1e-4):
            print("  ^ MISMATCH: config excluded", flush=True)
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best[1]


def bench_scan(results, copy_gbs, quick, no_sweep=False, models=None, sweep_stages=(1,)):
    print("== selective scan benchmark", flush=True)
    for model, (dims, n) in MODELS.items():
        if models and model not in models:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            ib = torch.finfo(dtype).bits // 8
            best_f = best_b = None
            for stage, (di, length) in enumerate(zip(dims, LENGTHS)):
                if quick and stage > 0:
                    break
                kc = K * di
                ins = make_inputs(BATCH, kc, n, length, dtype, seed=stage)
                gy = torch.randn(BATCH, kc, length, device="cuda")
                if stage + 1 in sweep_stages and not no_sweep:  # later stages reuse the last sweep's best
                    best_f = sweep("fwd", n, ins, gy)
                    best_b = sweep("bwd", n, ins, gy)
                    print(f"  best fwd {best_f}, best bwd {best_b}", flush=True)
                t_fwd_def = bench(lambda: selective_scan_fwd(*ins, True))
                t_fwd = bench(lambda: selective_scan_fwd(*ins, True, config=best_f))
                t_bwd = bench(lambda: selective_scan_bwd(gy, *ins, True, config=best_b))
                # default configs with the forward keeping the backward's states (what the op does at d_state 1,
                # 2 and 16)
                states = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device="cuda")
                t_fwd_saving = bench(lambda: selective_scan_fwd(*ins, True, states_out=states))
                t_bwd_saved = bench(lambda: selective_scan_bwd(gy, *ins, True, states=states))
                # through the public autograd API (custom op, casts of gradients to input dtype)
                t_api = op_fwd_bwd_ms(ins, gy)
                t_torch = float("nan")
                if not quick and stage == 0 and dtype == torch.float32:
                    t_torch = bench(lambda: selective_scan(*ins, delta_softplus=True, backend="torch"))
                fb = scan_bytes(BATCH, kc, n, length, ib, False)
                fbb = scan_bytes(BATCH, kc, n, length, ib, True)
                row = {
                    "model": model, "stage": stage + 1, "dtype": str(dtype).replace("torch.", ""), "KC": kc,
                    "N": n, "L": length, "fwd_ms": t_fwd, "fwd_default_ms": t_fwd_def,
                    "kernels_fwd_bwd_ms": t_fwd + t_bwd, "api_fwd_bwd_ms": t_api,
                    "fwd_GBs": fb / t_fwd / 1e6, "fwd_bwd_GBs": fbb / (t_fwd + t_bwd) / 1e6,
                    "api_fwd_bwd_GBs": fbb / t_api / 1e6,
                    "fwd_frac_copy": fb / t_fwd / 1e6 / copy_gbs,
                    "fwd_bwd_frac_copy": fbb / (t_fwd + t_bwd) / 1e6 / copy_gbs,
                    "api_fwd_bwd_frac_copy": fbb / t_api / 1e6 / copy_gbs,
                    "kernels_fwd_bwd_saved_states_ms": t_fwd_saving + t_bwd_saved,
                    "fwd_bwd_saved_states_frac_copy": fbb / (t_fwd_saving + t_bwd_saved) / 1e6 / copy_gbs,
                    "torch_backend_fwd_ms": t_torch, "cfg_fwd": best_f, "cfg_bwd": best_b,
                }
                results["scan"].append(row)
                print(f"{model} s{stage + 1} {row['dtype']:8s} KC={kc:5d} N={n:2d} L={length:5d}: "
                      f"fwd {t_fwd:.3f} ms ({row['fwd_GBs']:.0f} GB/s, {row['fwd_frac_copy']:.0%}) "
                      f"[default cfg {t_fwd_def:.3f}] | fwd+bwd kernels {t_fwd + t_bwd:.3f} ms "
                      f"({row['fwd_bwd_frac_copy']:.0%}) | with saved states {t_fwd_saving + t_bwd_saved:.3f} ms "
                      f"({row['fwd_bwd_saved_states_frac_copy']:.0%}) | api fwd+bwd {t_api:.3f} ms "
                      f"({row['api_fwd_bwd_frac_copy']:.0%}) | torch backend fwd {t_torch:.2f} ms", flush=True)
                torch.cuda.empty_cache()


def bench_cross(results, copy_gbs):
    print("== cross scan / merge", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for channels, hw in ((192, 56), (384, 28), (768, 14)):
            for channel_last in (False, True):
                shape = (BATCH, hw, hw, channels) if channel_last else (BATCH, channels, hw, hw)
                x = torch.randn(shape, device="cuda", dtype=dtype)
                y_ref = cross_scan(x, "cross2d", channel_last)
                y = cross_scan_triton(x, "cross2d", channel_last)
                ok_s = torch.equal(y, y_ref)
                m_ref = cross_merge(y_ref.float(), hw, hw, "cross2d", channel_last)
                m = cross_merge_triton(y, hw, hw, "cross2d", channel_last)
                err_m = rel(m, m_ref)
                t_s, t_m, best = float("inf"), float("inf"), {}
                for blocks in CROSS_SWEEP:
                    triton_cross.BLOCKS.clear()
                    if blocks is not None:
                        triton_cross.BLOCKS.update({(channel_last, False): blocks, (channel_last, True): blocks})
                    ts = bench(lambda: cross_scan_triton(x, "cross2d", channel_last))
                    tm = bench(lambda: cross_merge_triton(y, hw, hw, "cross2d", channel_last))
                    print(f"  cross blocks {blocks}: scan {ts:.3f} merge {tm:.3f} ms", flush=True)
                    if ts < t_s:
                        t_s, best["scan"] = ts, blocks
                    if tm < t_m:
                        t_m, best["merge"] = tm, blocks
                triton_cross.BLOCKS.clear()
                t_s_ref = bench(lambda: cross_scan(x, "cross2d", channel_last).contiguous())
                t_m_ref = bench(lambda: cross_merge(y, hw, hw, "cross2d", channel_last).contiguous())
                nbytes = x.numel() * x.element_size() * 5  # read map once, write 4 routes (or reverse)
                row = {"dtype": str(dtype).replace("torch.", ""), "C": channels, "HW": hw,
                       "channel_last": channel_last, "best_blocks": best, "scan_equal": ok_s, "merge_rel_err": err_m,
                       "scan_ms": t_s, "scan_torch_ms": t_s_ref, "merge_ms": t_m, "merge_torch_ms": t_m_ref,
                       "scan_frac_copy": nbytes / t_s / 1e6 / copy_gbs,
                       "merge_frac_copy": nbytes / t_m / 1e6 / copy_gbs}
                results["cross"].append(row)
                print(f"cross2d {row['dtype']} C={channels} {hw}x{hw} cl={channel_last}: scan {t_s:.3f} ms "
                      f"({row['scan_frac_copy']:.0%} copy; torch {t_s_ref:.3f}) merge {t_m:.3f} ms "
                      f"({row['merge_frac_copy']:.0%}; torch {t_m_ref:.3f}) equal={ok_s} merge err={err_m:.1e}",
                      flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_scan.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep-stages", default="1", help="stages (1-4) whose configurations are swept")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="time the default configs only")
    parser.add_argument("--models", default="", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--no-cross", action="store_true")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "batch": BATCH,
        "protocol": "triton.testing.do_bench median, warmup 25 ms, rep 150 ms; fresh randn inputs",
        "correctness": [], "reference": [], "scan": [], "cross": [],
    }
    copy_gbs = copy_bandwidth()
    results["copy_GBs"] = copy_gbs
    print(f"{results['gpu']} torch {torch.__version__} triton {triton.__version__}: "
          f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    print("default configs:", {n: default_config(96, n) for n in (1, 16)}, flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o)

    sections = [lambda: bench_scan(results, copy_gbs, args.quick, args.no_sweep, models,
                                          tuple(int(x) for x in args.sweep_stages.split(",")))]
    if not args.no_cross:
        sections.append(lambda: bench_cross(results, copy_gbs))
    if not args.skip_correctness:
        sections.insert(0, lambda: check_correctness(results))
    for section in sections:
        try:
            section()
        except Exception:  # noqa: BLE001 - keep the other sections' results
            traceback.print_exc()
        save()


if __name__ == "__main__":
    main()

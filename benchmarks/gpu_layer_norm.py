"""LayerNorm kernels at VMamba-T's shapes against aten and the copy bandwidth (CUDA).

    PYTHONPATH=src python benchmarks/gpu_layer_norm.py [--batch 128] [--sweep] [--out ln.json]

For every stage of VMamba-T at 224² (rows = batch·H·W, C = 96·2^i), bf16 input and gradient as
under autocast, timed between CUDA events after warm-up:
  * forward and backward of aten's layer norm (``native_layer_norm`` / ``native_layer_norm_backward``);
  * our forward (K = 1, and K = 4 summed as SS2D's out-norm) and backward in the default config, the
    backward also as CUDA-graph replays (median of 100 ms; its GPU work without the host);
  * with --sweep, the backward over tile rows, warps and programs per SM.
The small stages' timings include the host's launch time when it exceeds the kernels' (several
launches per call); the model profile (gpu_profile.py) gives their kernel times.
GB/s counts each input read once and each output written once (forward: x in, y out; backward: x
and dy in, dx out), against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from cuda_timing import copy_bandwidth, timed
from triton.testing import do_bench_cudagraph

STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def stage_row(k, batch: int, side: int, channels: int, sweep: bool, sms: int) -> dict:
    rows = batch * side * side
    dtype = torch.bfloat16
    x = torch.randn(rows, channels, device="cuda", dtype=dtype)
    xs = torch.randn(4, rows, channels, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    w = torch.randn(channels, device="cuda")
    b = torch.randn(channels, device="cuda")
    elem = x.element_size() * rows * channels
    out = {"rows": rows, "C": channels}

    wh, bh = w.to(dtype), b.to(dtype)  # aten wants the parameters in the input's dtype
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, [channels], wh, bh, 1e-5)
    ms = timed(lambda: torch.ops.aten.native_layer_norm(x, [channels], wh, bh, 1e-5), 3, 20)
    out["aten_fwd"] = {"ms": ms, "GBs": gbs(2 * elem, ms)}
    ms = timed(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [channels], mean, rstd, wh, bh,
                                                                  [True, True, True]), 3, 20)
    out["aten_bwd"] = {"ms": ms, "GBs": gbs(3 * elem, ms)}

    ms = timed(lambda: k.layer_norm_fwd(x[None], w, b, 1e-5, dtype), 3, 20)
    out["fwd"] = {"ms": ms, "GBs": gbs(2 * elem, ms)}
    ms = timed(lambda: k.layer_norm_fwd(xs, w, b, 1e-5, dtype, True), 3, 20)
    out["fwd_sum4"] = {"ms": ms, "GBs": gbs(6 * elem, ms)}  # 4 in, y and the sum out
    _, mean, rstd, _ = k.layer_norm_fwd(x[None], w, b, 1e-5, dtype)
    ms = timed(lambda: k.layer_norm_bwd(dy, x, w, mean, rstd, True), 3, 20)
    out["bwd"] = {"ms": ms, "GBs": gbs(3 * elem, ms)}
    ms = do_bench_cudagraph(lambda: k.layer_norm_bwd(dy, x, w, mean, rstd, True), rep=100, return_mode="median")
    out["bwd_graph"] = {"ms": ms, "GBs": gbs(3 * elem, ms)}  # GPU work only: the host's launch time left out
    if sweep:
        results = []
        for block_m, warps, per_sm in itertools.product((4, 8, 16, 32), (2, 4, 8), (2, 4, 16, 128)):
            cfg = dict(block_m=block_m, num_warps=warps, num_programs=per_sm * sms)
            ms = timed(lambda cfg=cfg: k.layer_norm_bwd(dy, x, w, mean, rstd, True, **cfg), 2, 10)
            results.append((ms, cfg))
        results.sort(key=lambda r: r[0])
        out["bwd_sweep_best"] = [{"ms": ms, "GBs": gbs(3 * elem, ms), **cfg} for ms, cfg in results[:8]]
        out["bwd_sweep_worst"] = [{"ms": ms, **cfg} for ms, cfg in results[-3:]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default="gpu_layer_norm.json")
    args = parser.parse_args()
    from vmamba.ops.triton import layer_norm as k

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBs": copy_bandwidth(),
              "stages": []}
    print(json.dumps({"copy_GBs": report["copy_GBs"]}), flush=True)
    for side, channels in STAGES:
        row = stage_row(k, args.batch, side, channels, args.sweep, sms)
        report["stages"].append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

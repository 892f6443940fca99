"""Fused SS2D core against the unfused composition, per VMamba stage, on a CUDA device.

    PYTHONPATH=src python benchmarks/gpu_ss2d_core.py [--model vmamba_tiny_s1l8] [--batch 128]

For the first SS2D layer of every stage: the scan part of SS2D from the activated map to the merged
(summed) route outputs, forward and forward+backward, in fp32 and bf16 inputs:
  * fused: ``ss2d_core`` (routes read in place, Δ computed in-kernel) + sum over routes,
  * unfused: ``cross_scan`` → per-route projections → ``selective_scan`` → ``cross_merge``.
Also the fused forward's effective bandwidth (map read once per route, projections read, route outputs
written) against the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from cuda_timing import copy_bandwidth, timed


def bench_layer(ss2d, batch, size, dtype, bandwidth) -> dict:
    x = torch.randn(batch, ss2d.d_inner, size, size, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    row = {"dtype": str(dtype).removeprefix("torch."), "H": size, "C": ss2d.d_inner, "K": ss2d.routes,
           "N": ss2d.d_state}

    autocast = dtype != torch.float32  # the layer's weights stay float32, as in a bf16-autocast model

    def fused():
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            return ss2d._scan_routes_fused(x).sum(0)

    def unfused():
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            return ss2d._scan_2d(x)

    for name, fn in (("fused", fused), ("unfused", unfused)):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = timed(fn, iters=20)
        grad = torch.randn_like(fn().float()).to(dtype)

        def step(fn=fn, grad=grad):
            fn().backward(grad)
            x.grad = None
            ss2d.zero_grad(set_to_none=True)

        row[f"{name}_fwdbwd_ms"] = timed(step, iters=20)
    with torch.no_grad():
        row["core_fwd_ms"] = timed(lambda: ss2d._scan_routes_fused(x.detach()), iters=20)
    pixels = batch * size * size
    width = ss2d.x_proj_weight.shape[1]
    moved = pixels * x.element_size() * (ss2d.d_inner * (1 + ss2d.routes) + ss2d.routes * width)
    row["core_fwd_GBps"] = moved / row["core_fwd_ms"] / 1e6
    row["core_fwd_vs_copy"] = row["core_fwd_GBps"] / bandwidth
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="gpu_ss2d_core.json")
    args = parser.parse_args()
    import vmamba
    from vmamba.layers.ss2d import SS2D

    model = vmamba.create_model(args.model).cuda()
    bandwidth = copy_bandwidth()
    rows = []
    size = 56
    for stage, layer in enumerate(model.layers):
        ss2d = next(m for m in layer.modules() if isinstance(m, SS2D))
        for dtype in (torch.float32, torch.bfloat16):
            row = {"stage": stage + 1, **bench_layer(ss2d, args.batch, size, dtype, bandwidth)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        size //= 2
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": bandwidth,
           "model": args.model, "batch": args.batch, "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

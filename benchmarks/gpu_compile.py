"""torch.compile(fullgraph=True) against eager for a VMamba model: bf16 inference throughput (CUDA).

    PYTHONPATH=src python benchmarks/gpu_compile.py [--model vmamba_tiny_s1l8] [--batch 128] [--mode reduce-overhead]

``--mode reduce-overhead`` replays CUDA graphs, which removes the per-kernel launch cost on the host.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import timed


def throughput(fn, x, warmup=3, iters=10):
    """Images per second of bf16-autocast inference."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return x.shape[0] * 1000 / timed(lambda: fn(x), warmup, iters)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: PyTorch's default)")
    args = parser.parse_args()
    import vmamba

    torch.backends.cudnn.benchmark = True
    model = vmamba.create_model(args.model).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    eager = throughput(model, x)
    compiled = torch.compile(model, fullgraph=True, mode=args.mode)
    t0 = time.time()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        diff = (compiled(x).float() - model(x).float()).abs().max().item()
    row = {"model": args.model, "batch": args.batch, "mode": args.mode, "compile_s": time.time() - t0,
           "max_abs_diff": diff, "eager_img_s": eager, "compiled_img_s": throughput(compiled, x)}
    row["compiled_vs_eager"] = row["compiled_img_s"] / eager
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""torch.compile(fullgraph=True) against eager for a VMamba model: bf16 inference throughput (CUDA).

    PYTHONPATH=src python benchmarks/gpu_compile.py [--model vmamba_tiny_s1l8] [--batch 128] [--mode reduce-overhead]
        [--compiled-norm auto|triton|inductor] [--iters 10]

``--mode reduce-overhead`` replays CUDA graphs, which removes the per-kernel launch cost on the host.
Besides images/s, each row has the host time to issue one forward (``*_host_ms``, perf_counter before
the final synchronize): when it is close to the forward's time, the host sets the pace.
``--compiled-norm`` picks the compiled model's LayerNorm code (vmamba.ops.layer_norm.COMPILED_NORM).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import add_compiled_norm_option, apply_compiled_norm_option, timed
from gpu_train_step import host_time


def throughput(fn, x, iters=10):
    """(images per second, host ms to issue one forward) of bf16-autocast inference."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        images_s = x.shape[0] * 1000 / timed(lambda: fn(x), 3, iters)
        return images_s, host_time(lambda: fn(x), iters)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: PyTorch's default)")
    parser.add_argument("--iters", type=int, default=10)
    add_compiled_norm_option(parser)
    args = parser.parse_args()
    apply_compiled_norm_option(args)
    import vmamba

    torch.backends.cudnn.benchmark = True
    model = vmamba.create_model(args.model).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    eager, eager_host = throughput(model, x, args.iters)
    compiled = torch.compile(model, fullgraph=True, mode=args.mode)
    t0 = time.time()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        diff = (compiled(x).float() - model(x).float()).abs().max().item()
    compile_s = time.time() - t0
    compiled_img_s, compiled_host = throughput(compiled, x, args.iters)
    row = {"model": args.model, "batch": args.batch, "mode": args.mode,
           "compiled_norm": args.compiled_norm, "compile_s": compile_s, "max_abs_diff": diff,
           "eager_img_s": eager, "eager_host_ms": eager_host, "compiled_img_s": compiled_img_s,
           "compiled_host_ms": compiled_host}
    row["compiled_vs_eager"] = row["compiled_img_s"] / eager
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Where an eager inference forward's time goes: GPU work or the host's issue rate (CUDA).

    PYTHONPATH=src python benchmarks/gpu_infer_host.py [--models vmamba_small_s2l15,swin_small_patch4_window7_224]
        [--host-profile]

Per model, batch 128 at 224², bf16 autocast, channels_last, eval mode under ``torch.inference_mode``:
  * eager_ms: wall time per forward between CUDA events (warm-up, then timed forwards);
  * host_ms: host time to issue one forward (perf_counter around the forwards, before the final
    synchronize): when it is close to eager_ms the forward is bound by the host, not the GPU;
  * graph_ms: the forward replayed from a CUDA graph (vmamba.cuda_graph.graph_for_inference): its GPU
    work with no launch overhead.
With --host-profile two eager forwards of each model also run under cProfile and the functions with
the most host time are printed. To compare two source trees (before / after a change), run the script
once per tree with PYTHONPATH pointing at each, alternating, in one device call.
"""

from __future__ import annotations

import argparse

import torch
from cuda_timing import run_models, timed
from gpu_models import build
from gpu_train_step import host_profile, host_time


def bench(name: str, batch: int, iters: int, profile_host: bool = False) -> dict:
    from vmamba.cuda_graph import graph_for_inference

    model = build(name).cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    row = {"model": name, "eager_ms": timed(forward, 3, iters), "host_ms": host_time(forward, iters)}
    if profile_host:
        print(f"== host profile, {name}, two forwards\n{host_profile(forward)}", flush=True)
    graphed = graph_for_inference(model, x, torch.bfloat16, clone_outputs=False)
    row["graph_ms"] = timed(lambda: graphed(x), 3, iters)
    for key in ("eager_ms", "graph_ms"):
        row[key.replace("_ms", "_img_s")] = batch * 1000 / row[key]
    model.cpu()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vmamba_small_s2l15,swin_small_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--host-profile", action="store_true", help="print a cProfile of two eager forwards")
    parser.add_argument("--out", default="gpu_infer_host.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    run_models(lambda name: bench(name, args.batch, args.iters, args.host_profile), args.models.split(","),
               args.out, args.batch)


if __name__ == "__main__":
    main()

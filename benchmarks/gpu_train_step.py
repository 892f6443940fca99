"""Where a training step's time goes: GPU work or host-side launch overhead (CUDA).

    PYTHONPATH=src python benchmarks/gpu_train_step.py [--models vmamba_tiny_s1l8,swin_tiny_patch4_window7_224]
        [--compile-mode default|reduce-overhead|max-autotune-no-cudagraphs]

Per model, batch 128 at 224², bf16 autocast, channels_last, one step = forward + cross-entropy +
backward (no optimizer), as in gpu_models.py:
  * eager_ms: wall time per step between CUDA events (warm-up, then timed steps);
  * host_ms: host time to issue one step's work (perf_counter around the steps, before the final
    synchronize): when it is close to eager_ms the step is bound by the host, not the GPU;
  * graph_ms: the same step captured once as a CUDA graph and replayed: GPU time with no launch
    overhead (autocast's weight-cast cache off, as graph capture requires);
  * graphed_ms: the step of `vmamba train --cuda-graph`: the model's forward and backward replayed as
    CUDA graphs (vmamba.train.engine.graph_for_training), the loss and autograd glue eager.
With --host-profile, two eager steps of each model also run under cProfile and the functions with the
most host time are printed (how the custom-op wrapper's cost was found; BENCHMARKS.md, session 4).
With --compile-mode the model is wrapped in torch.compile with that mode first; eager_ms and host_ms
then time the compiled step (compilation happens in the warm-up) and no graph is captured.
--compiled-norm (auto, triton, inductor) sets vmamba.ops.layer_norm.COMPILED_NORM first: which
LayerNorm code compiled models run, our custom ops or Inductor's (BENCHMARKS.md, sessions 24-25).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from cuda_timing import add_compiled_norm_option, apply_compiled_norm_option, run_models, timed
from gpu_models import build


def train_step_fn(model, x, target, cache=True):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        return loss

    return step


def host_time(step, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    return host * 1e3


def graph_time(model, x, target, iters):
    step = train_step_fn(model, x, target, cache=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            for p in model.parameters():
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timed(graph.replay, 3, iters)


def graphed_time(model, x, target, iters):
    """Per-step time with the model graphed as `vmamba train --cuda-graph` does (replaces its forward)."""
    from vmamba.train.engine import graph_for_training

    graphed = graph_for_training(model, tuple(x.shape), torch.bfloat16, channels_last=True)
    step = train_step_fn(graphed, x, target, cache=False)

    def run():
        step()
        for p in model.parameters():
            p.grad = None

    return timed(run, 3, iters)


def host_profile(step, rows: int = 25) -> str:
    """cProfile of two eager steps: the functions with the most own host time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def bench(name, batch, iters, compile_mode="", profile_host=False):
    model = build(name).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    step = train_step_fn(torch.compile(model, mode=compile_mode) if compile_mode else model, x, target)

    def eager():
        step()
        for p in model.parameters():
            p.grad = None

    row = {"model": name, "compile_mode": compile_mode or "eager", "eager_ms": timed(eager, 3, iters),
           "host_ms": host_time(eager, iters)}
    if profile_host:
        print(f"== host profile, {name}, two steps\n{host_profile(eager)}", flush=True)
    if not compile_mode:
        try:
            row["graph_ms"] = graph_time(model, x, target, iters)
        except Exception as exc:  # noqa: BLE001 - report, keep the other rows
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            row["graphed_ms"] = graphed_time(model, x, target, iters)
        except Exception as exc:  # noqa: BLE001 - report, keep the other rows
            row["graphed_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for key in ("eager_ms", "graph_ms", "graphed_ms"):
        if key in row:
            row[key.replace("_ms", "_img_s")] = batch * 1000 / row[key]
    model.cpu()
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="vmamba_tiny_s1l8,swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile-mode", default="", help="torch.compile mode; empty: eager")
    parser.add_argument("--host-profile", action="store_true", help="print a cProfile of two eager steps")
    parser.add_argument("--out", default="gpu_train_step.json")
    add_compiled_norm_option(parser)
    args = parser.parse_args()
    apply_compiled_norm_option(args)
    torch.backends.cudnn.benchmark = True
    run_models(lambda name: bench(name, args.batch, args.iters, args.compile_mode, args.host_profile),
               args.models.split(","), args.out, args.batch)


if __name__ == "__main__":
    main()

"""Model throughput and peak memory on a CUDA device: VMamba vs timm baselines.

    PYTHONPATH=src python benchmarks/gpu_models.py [--batch 128] [--out models.json]

Protocol (printed into the results): batch 128 at 224x224, random inputs, channels_last inputs and
weights, cudnn.benchmark on. Modes per model:
  * fp32 inference with PyTorch's default TF32 settings (matmul TF32 off, cuDNN conv TF32 on),
  * fp32 inference with TF32 on for matmul and cuDNN,
  * bf16 autocast inference,
  * one training step: forward + cross-entropy + backward under bf16 autocast (optimizer excluded;
    gradients set to None between steps), peak memory measured around it.
With --cuda-graph, also for every model: bf16 inference replayed from a CUDA graph
(vmamba.cuda_graph.graph_for_inference) and the training step with forward and backward replayed
from CUDA graphs (vmamba.train.engine.graph_for_training; loss and autograd glue eager), so that
models bound by the host's issue rate are compared on their GPU work.
Each mode: warm-up iterations, then timed iterations between CUDA events; images/s = batch*iters/time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import traceback

import torch
import torch.nn.functional as F
from cuda_timing import timed

VMAMBA = ["vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15"]
TIMM = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
        "convnext_tiny", "deit_small_patch16_224"]


def build(name):
    import vmamba

    if name in vmamba.list_models():
        return vmamba.create_model(name)
    import timm

    return timm.create_model(name)


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def bench_model(name, batch, warmup, iters, cuda_graph=False):
    """One row; a VMamba name ending in "@unfused" runs SS2D as cross_scan → scan → cross_merge."""
    if name.endswith("@unfused"):
        from vmamba.ops.ss2d_core import use_fused_core

        with use_fused_core(False):
            return {**_bench_model(name.removesuffix("@unfused"), batch, warmup, iters, cuda_graph), "model": name}
    return _bench_model(name, batch, warmup, iters, cuda_graph)


def _graphed_rows(model, x, target, batch, warmup, iters):
    """bf16 inference and the bf16 training step (no optimizer) replayed from CUDA graphs."""
    from gpu_train_step import graphed_time  # (imported here: gpu_train_step imports this module)

    from vmamba.cuda_graph import graph_for_inference

    graphed = graph_for_inference(model, x, torch.bfloat16, clone_outputs=False)
    return {"infer_bf16_graph_img_s": batch * 1000 / timed(lambda: graphed(x), warmup, iters),
            "train_bf16_graph_img_s": batch * 1000 / graphed_time(model, x, target, iters)}


def _bench_model(name, batch, warmup, iters, cuda_graph=False):
    model = build(name).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    model.eval()
    default_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with torch.no_grad():
        for label, tf32, autocast in (("fp32", None, False), ("fp32_tf32", True, False), ("bf16", None, True)):
            if tf32 is None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = default_tf32
            else:
                set_tf32(tf32)
            torch.cuda.reset_peak_memory_stats()

            def infer(autocast=autocast):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    model(x)

            ms = timed(infer, warmup, iters)
            row[f"infer_{label}_img_s"] = batch * 1000 / ms
            row[f"infer_{label}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = default_tf32
    model.train()

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = timed(train_step, max(1, warmup - 1), iters)
    row["train_bf16_img_s"] = batch * 1000 / ms
    row["train_bf16_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if cuda_graph:
        row.update(_graphed_rows(model, x, target, batch, warmup, iters))
    model.cpu()
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", default=",".join(VMAMBA + TIMM))
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--out", default="gpu_models.json")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also bf16 inference and training steps replayed from CUDA graphs")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    import triton

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "timm": timm_version, "batch": args.batch, "warmup": args.warmup, "iters": args.iters,
        "protocol": "224x224 random input, channels_last, cudnn.benchmark=True; fp32 = PyTorch default TF32 "
                    "(matmul off, cudnn on); fp32_tf32 = both on; bf16 = autocast; train = fwd+CE+bwd under "
                    "bf16 autocast, no optimizer; CUDA-event timing of `iters` iterations after `warmup`",
        "rows": [],
    }
    t0 = time.time()
    for name in args.models.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"budget exhausted, skipping {name}", flush=True)
            continue
        try:
            row = bench_model(name, args.batch, args.warmup, args.iters, args.cuda_graph)
        except Exception as exc:  # noqa: BLE001 - keep going with the other models
            traceback.print_exc()
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
            torch.cuda.empty_cache()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'model':32s} {'fp32':>8s} {'tf32':>8s} {'bf16':>8s} {'train':>8s} {'trainGiB':>8s} "
          f"{'bf16grph':>8s} {'trngrph':>8s}")
    for row in results["rows"]:
        if "error" in row:
            print(f"{row['model']:32s} ERROR {row['error'][:80]}")
            continue
        print(f"{row['model']:32s} {row['infer_fp32_img_s']:8.0f} {row['infer_fp32_tf32_img_s']:8.0f} "
              f"{row['infer_bf16_img_s']:8.0f} {row['train_bf16_img_s']:8.0f} {row['train_bf16_peak_GiB']:8.1f} "
              f"{row.get('infer_bf16_graph_img_s', float('nan')):8.0f} "
              f"{row.get('train_bf16_graph_img_s', float('nan')):8.0f}")


if __name__ == "__main__":
    main()

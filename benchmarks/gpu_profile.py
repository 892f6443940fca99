"""Per-op GPU profile of a VMamba model, or of a timm model by name: where a bf16 training step and a
bf16 inference pass spend time.

    PYTHONPATH=src python benchmarks/gpu_profile.py [--model vmamba_tiny_s1l8] [--batch 128] [--out prof.txt]
        [--compile-mode default]

With --compile-mode the model runs under torch.compile (compiled in the warm-up steps): the table
then shows Inductor's kernels, and the summed kernel time against the step's wall time says whether
the compiled step is bound by the GPU or by the host. --compiled-norm picks the LayerNorm code there
(vmamba.ops.layer_norm.COMPILED_NORM: auto, triton or inductor). Each report ends with the kernel
time per step summed by kind (:func:`kernel_kinds`: SS2D core, GEMMs, LayerNorm, ...).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from cuda_timing import add_compiled_norm_option, apply_compiled_norm_option
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# (kind, exact kernel names, substrings of kernel names): first match wins; names as CUDA reports them
KINDS = (
    ("SS2D core and scan (Triton)", (), ("_core_", "_delta_gemm", "_partial_sums", "_ss_", "_rows_bwd", "_packed_fwd",
                                         "_cross_kernel")),
    ("LayerNorm (Triton)", ("_fwd_kernel", "_bwd_kernel"), ()),
    ("Inductor kernels", (), ("triton_",)),
    ("convolutions", (), ("conv", "grad2d", "implicit_gemm", "Padding", "cudnn")),
    ("GEMMs", (), ("nvjet", "gemm", "splitKreduce")),
    ("reductions", (), ("reduce_kernel",)),
    ("GELU", (), ("Gelu",)),
    ("other elementwise", (), ("elementwise", "direct_copy")),
    ("copies, cat", (), ("Cat", "Memcpy", "Memset")),
)


def kernel_kind(name: str) -> str:
    """The :data:`KINDS` entry a kernel name belongs to ("other" if none)."""
    for kind, names, parts in KINDS:
        if name in names or any(part in name for part in parts):
            return kind
    return "other"


def is_kernel(event) -> bool:
    """A GPU-side event (kernel, copy, fill), not a CPU op that launched one."""
    return event.device_type == DeviceType.CUDA and event.self_device_time_total > 0


def kernel_kinds(events, steps: int) -> str:
    """Kernel time per step summed by kind (:func:`kernel_kind`), largest first, as text lines."""
    totals: dict[str, float] = {}
    for event in filter(is_kernel, events):
        kind = kernel_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_device_time_total / steps / 1e3
    return "\n".join(f"  {kind:32s} {ms:8.2f} ms" for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--out", default="gpu_profile.txt")
    parser.add_argument("--compile-mode", default="", help="torch.compile mode; empty: eager")
    parser.add_argument("--by-op-shape", action="store_true",
                        help="rows are PyTorch ops with their input shapes (GPU time of the kernels they launched)")
    add_compiled_norm_option(parser)
    args = parser.parse_args()
    import vmamba

    apply_compiled_norm_option(args)

    torch.backends.cudnn.benchmark = True
    if args.model in vmamba.list_models():
        model = vmamba.create_model(args.model)
    else:  # a timm peer (e.g. swin_small_patch4_window7_224) for a side-by-side split
        import timm

        model = timm.create_model(args.model)
    model = model.cuda().to(memory_format=torch.channels_last)
    net = torch.compile(model, mode=args.compile_mode) if args.compile_mode else model
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), target)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            net(x)

    report = []
    for name, fn, steps in (("train step (bf16 autocast)", train_step, 2), ("inference (bf16 autocast)", infer, 3)):
        model.train(fn is train_step)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if args.by_op_shape else [ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=args.by_op_shape) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
        kernels = prof.key_averages()
        total = sum(e.self_device_time_total for e in kernels if is_kernel(e)) / steps
        events = prof.key_averages(group_by_input_shape=True) if args.by_op_shape else kernels
        sort_by = "self_cuda_time_total" if args.by_op_shape else "cuda_time_total"
        table = events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70,
                             max_shapes_column_width=90)
        text = f"== {args.model} {name}, batch {args.batch}: {steps} steps profiled; " \
               f"summed kernel time per step {total / 1e3:.1f} ms, wall time per step (profiled) {wall_ms:.1f} ms" \
               f"{', compiled: ' + args.compile_mode if args.compile_mode else ''}\n{table}\n" \
               f"kernel time per step by kind:\n{kernel_kinds(kernels, steps)}\n"
        print(text, flush=True)
        report.append(text)
    with open(args.out, "w") as f:
        f.write("\n".join(report))


if __name__ == "__main__":
    main()

"""Host-side work per VSS block on the CUDA code path, counted on the CPU (no GPU needed).

    python benchmarks/host_ops.py [--model vmamba_tiny_s1l8]

In eager mode a VMamba training step on an H200 is bound by the host (BENCHMARKS.md): its time is
roughly the number of PyTorch ops and kernel launches it issues. This script runs the CUDA code path
on the CPU (the fused SS2D core and the Triton LayerNorm under TRITON_INTERPRET=1, forced on) and
counts, per training step (bf16 autocast forward + cross-entropy + backward) and per inference
forward, the aten ops dispatched by our code and the Triton kernel launches. The counts for one VSS
block are the difference between two models that differ by one stage-3 block. Kernel-internal work
of the interpreter is not counted.
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402


class HostOps(TorchDispatchMode):
    """Counts aten ops (by name) and Triton launches issued while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def force_cuda_path(counter_ref: list) -> None:
    """Route SS2D and LayerNorm through the Triton ops on CPU tensors; count launches, not their insides."""
    import triton.runtime.interpreter as interpreter

    import vmamba.ops.layer_norm as layer_norm
    from vmamba.layers.ss2d import SS2D

    layer_norm._FORCE_TRITON = True
    SS2D._uses_fused_core = lambda self, x: True
    launch = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        if counter_ref and counter_ref[0] is not None:
            counter_ref[0].launches += 1
        with _disable_current_modes():
            return launch(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted


def count(model, train: bool, counter_ref: list) -> HostOps:
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    target = torch.tensor([1])
    model.train(train)
    counter = HostOps()
    counter_ref[:] = [counter]
    with counter:
        if train:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
        else:
            with torch.no_grad():
                model(x)
    counter_ref[:] = [None]
    return counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    args = parser.parse_args()
    import vmamba

    counter_ref: list = [None]
    force_cuda_path(counter_ref)
    torch.manual_seed(0)
    result = {}
    for mode, train in (("train_step", True), ("inference", False)):
        counts = []
        for blocks in (1, 2):
            model = vmamba.create_model(args.model, dims=16, depths=[1, 1, blocks, 1])
            counts.append(count(model.to(memory_format=torch.channels_last), train, counter_ref))
        per_block = counts[1].ops - counts[0].ops
        result[mode] = {"aten_ops_per_block": sum(per_block.values()),
                        "triton_launches_per_block": counts[1].launches - counts[0].launches,
                        "top_ops": per_block.most_common(12)}
    for mode, row in result.items():
        top = ", ".join(f"{name} {n}" for name, n in row["top_ops"])
        print(f"{mode}: {row['aten_ops_per_block']} aten ops and {row['triton_launches_per_block']} Triton launches "
              f"per block; most frequent: {top}")


if __name__ == "__main__":
    main()

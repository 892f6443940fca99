"""Host-side work per VSS block on the CUDA code path, counted on the CPU (no GPU needed).

    python benchmarks/host_ops.py [--model vmamba_tiny_s1l8] [--by-source]

In eager mode a VMamba training step on an H200 is bound by the host (BENCHMARKS.md): its time is
roughly the number of PyTorch ops and kernel launches it issues. This script runs the CUDA code path
on the CPU (the fused SS2D core and the Triton LayerNorm under TRITON_INTERPRET=1, forced on) and
counts, per training step (bf16 autocast forward + cross-entropy + backward) and per inference
forward (inference mode, bf16 autocast), the aten ops dispatched by our code and the Triton kernel
launches. The counts for one VSS
block are the difference between two models that differ by one stage-3 block. Kernel-internal work
of the interpreter is not counted. With --by-source the ops per block are also listed by the line
of vmamba or torch.nn code that issued them ("autograd engine": backward formulas of PyTorch's own
ops and gradient accumulation).
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402


class HostOps(TorchDispatchMode):
    """Counts aten ops (by name, and with ``by_source`` by the issuing source line) and Triton launches."""

    def __init__(self, by_source: bool = False) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.sources: collections.Counter[tuple[str, str]] = collections.Counter()
        self.by_source = by_source
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if self.by_source:
            self.sources[(_issuing_line(), name)] += 1
        return func(*args, **(kwargs or {}))


def _issuing_line() -> str:
    """The innermost frame in vmamba or torch.nn code: file:line:function, else "autograd engine"."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/vmamba/" in frame.filename or "/torch/nn/" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}:{frame.name}"
    return "autograd engine"


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


def count(model, train: bool, counter_ref: list, by_source: bool = False) -> HostOps:
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    target = torch.tensor([1])
    model.train(train)
    counter = HostOps(by_source)
    counter_ref[:] = [counter]
    with counter:
        if train:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
        else:  # as the benchmarks run inference: inference mode, bf16 autocast
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
    counter_ref[:] = [None]
    return counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vmamba_tiny_s1l8")
    parser.add_argument("--by-source", action="store_true", help="list the ops per block by source line")
    args = parser.parse_args()
    import vmamba

    counter_ref: list = [None]
    force_cuda_path(counter_ref)
    torch.manual_seed(0)
    result, sources = {}, {}
    for mode, train in (("train_step", True), ("inference", False)):
        counts = []
        for blocks in (1, 2):
            model = vmamba.create_model(args.model, dims=16, depths=[1, 1, blocks, 1])
            counts.append(count(model.to(memory_format=torch.channels_last), train, counter_ref, args.by_source))
        per_block = counts[1].ops - counts[0].ops
        sources[mode] = counts[1].sources - counts[0].sources
        result[mode] = {"aten_ops_per_block": sum(per_block.values()),
                        "triton_launches_per_block": counts[1].launches - counts[0].launches,
                        "top_ops": per_block.most_common(12)}
    for mode, row in result.items():
        top = ", ".join(f"{name} {n}" for name, n in row["top_ops"])
        print(f"{mode}: {row['aten_ops_per_block']} aten ops and {row['triton_launches_per_block']} Triton launches "
              f"per block; most frequent: {top}")
    for mode in result if args.by_source else ():
        print(f"{mode}, ops per block by source line:")
        for line, ops in by_line(sources[mode]):
            print(f"  {sum(ops.values()):4d} {line}: " + ", ".join(f"{op.removeprefix('aten.')} x{n}"
                                                                  for op, n in ops.most_common()))


def by_line(sources: collections.Counter) -> list[tuple[str, collections.Counter]]:
    """(source line, its ops) for every line, the lines with most ops first."""
    lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (line, op), n in sources.items():
        lines[line][op] += n
    return sorted(lines.items(), key=lambda item: -sum(item[1].values()))


if __name__ == "__main__":
    main()

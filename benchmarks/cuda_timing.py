"""Timing helpers shared by the GPU benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then ``iters`` between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 3, 20)
    return 2 * nbytes / ms / 1e6


def run_models(bench: Callable[[str], dict], names: list[str], out: str, batch: int) -> list[dict]:
    """``bench(name)`` for every model: each row printed as a JSON line, all saved to ``out`` with the
    torch version and GPU."""
    rows = []
    for name in names:
        rows.append(bench(name))
        print(json.dumps(rows[-1]), flush=True)
    with open(out, "w") as fh:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "batch": batch, "rows": rows},
                  fh, indent=1)
    return rows


def add_compiled_norm_option(parser: argparse.ArgumentParser) -> None:
    """``--compiled-norm auto|triton|inductor``: which LayerNorm code torch.compile'd models run
    (vmamba.ops.layer_norm.COMPILED_NORM; BENCHMARKS.md, sessions 24-25). Apply it with
    :func:`apply_compiled_norm_option`."""
    parser.add_argument("--compiled-norm", choices=("auto", "triton", "inductor"), default="auto",
                        help="under torch.compile: our Triton LayerNorm ops, Inductor's, or auto (Inductor's "
                             "without gradients, ours with)")


def apply_compiled_norm_option(args: argparse.Namespace) -> None:
    """Sets ``vmamba.ops.layer_norm.COMPILED_NORM`` from ``--compiled-norm``."""
    import vmamba.ops.layer_norm as layer_norm

    layer_norm.COMPILED_NORM = layer_norm.CompiledNorm(args.compiled_norm)

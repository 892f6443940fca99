"""Host time of the Triton selective scan's Python side, with the kernel launches stubbed out (CPU).

    PYTHONPATH=src python benchmarks/host_triton_wrapper.py [--calls 2000] [--rounds 3] [--profile]

Times, per forward + backward of VMamba-T stage-3-like tiny inputs (batch 2, 64 channels, L 196,
d_state 1, bf16): the public op (``selective_scan(..., backend="triton")``: autograd, custom-op eager
twin, the Triton wrapper) and the wrapper alone (``selective_scan_fwd`` saving states, then
``selective_scan_bwd``). The kernels do not run, so this is the host cost that remains once the
kernels are fast; on a GPU the Triton launcher adds its own. Each round also times the op as it was
before session 12 ("uncached": ``default_config`` recomputed on every call and ``triton.cdiv`` for
ceiling division). Prints one JSON line; ``--profile`` adds cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time

import torch
import triton

import vmamba.ops  # noqa: F401  (registers the ops)
import vmamba.ops.triton.selective_scan as kernels
from vmamba.ops.selective_scan import selective_scan


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_call_us(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    kernels._ss_fwd_kernel = kernels._ss_bwd_kernel = _NoLaunch()
    scan_module = sys.modules["vmamba.ops.selective_scan"]
    scan_module.resolve_backend = lambda backend, device: scan_module.ScanBackend.TRITON  # CPU tensors
    g = torch.Generator().manual_seed(0)
    batch, channels, length, groups = 2, 64, 196, 4
    shapes = ((batch, channels, length), (batch, channels, length), (channels, 1), (batch, groups, 1, length),
              (batch, groups, 1, length), (channels,), (channels,))
    half = {0, 1, 3, 4}
    leaves = [torch.randn(*s, generator=g).to(torch.bfloat16 if i in half else torch.float32).requires_grad_()
              for i, s in enumerate(shapes)]
    grad = torch.randn(batch, channels, length, generator=g)
    states = torch.empty(kernels.saved_states_shape(*(leaves[i].detach() for i in (0, 2, 3))))
    ins = [t.detach() for t in leaves]

    def op():
        selective_scan(*leaves, delta_softplus=True, backend="triton").backward(grad)
        for t in leaves:
            t.grad = None

    def wrapper():
        kernels.selective_scan_fwd(*ins, True, states_out=states)
        kernels.selective_scan_bwd(grad, *ins, True, states=states)

    cached = kernels.default_config, kernels.cdiv

    def uncached_config(channels_per_group, state, backward=False, length=None, elem_size=4):
        return dict(kernels._default_config.__wrapped__(channels_per_group, state, backward, length, elem_size))

    rounds = {"op_us": [], "wrapper_us": [], "op_uncached_us": []}
    for _ in range(args.rounds):
        rounds["op_us"].append(round(_per_call_us(op, args.calls), 1))
        rounds["wrapper_us"].append(round(_per_call_us(wrapper, args.calls), 1))
        kernels.default_config, kernels.cdiv = uncached_config, triton.cdiv
        try:
            rounds["op_uncached_us"].append(round(_per_call_us(op, args.calls), 1))
        finally:
            kernels.default_config, kernels.cdiv = cached
    print(json.dumps({"torch": torch.__version__, **rounds}))
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [op() for _ in range(args.calls)])
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()

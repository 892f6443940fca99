"""Host time per call of one Triton LayerNorm forward, by the path that issues it (CUDA).

    PYTHONPATH=src python benchmarks/host_dispatch.py [--calls 2000]

On a tiny tensor (the GPU finishes each kernel long before the host issues the next), the time per
call is the host's cost of each path: aten's ``F.layer_norm``; the bare Triton launch
(``vmamba.ops.triton.layer_norm.layer_norm_fwd``); the eager twin (the ``autograd.Function`` that
eager VMamba uses); the ``torch.library`` custom op (what a ``torch.compile``d graph calls at run time,
called here with grad mode off, as inside a compiled graph). Also a no-op Python custom op, the
dispatcher's own floor. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


@torch.library.custom_op("vmamba_bench::noop", mutates_args=())
def _noop(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def per_call_us(fn, calls, sync=None):
    """Host time to issue one call of ``fn``, µs (``sync`` waits for the device: CUDA's by default)."""
    sync = sync or torch.cuda.synchronize
    for _ in range(50):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync()
    return host / calls * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    from vmamba.ops import layer_norm as ln
    from vmamba.ops.triton.layer_norm import layer_norm_fwd

    x = torch.randn(1, 64, 96, device="cuda")  # (K, rows, C)
    w, b = torch.ones(96, device="cuda"), torch.zeros(96, device="cuda")
    with torch.no_grad():
        row = {
            "aten_F.layer_norm": per_call_us(lambda: F.layer_norm(x[0], (96,), w, b), args.calls),
            "triton_launch": per_call_us(lambda: layer_norm_fwd(x, w, b, 1e-5, x.dtype, False), args.calls),
            "eager_twin": per_call_us(lambda: ln._NormEager.apply(x, w, b, 1e-5, x.dtype, False), args.calls),
            "custom_op": per_call_us(lambda: ln._fwd_op(x, w, b, 1e-5, x.dtype, False), args.calls),
            "noop_custom_op": per_call_us(lambda: _noop(x), args.calls),
        }
    print(json.dumps({"host_us_per_call": row, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()

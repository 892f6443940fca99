"""Host time per forward + backward of the plain selective scan op, by the path that issues it.

    PYTHONPATH=src python benchmarks/host_scan_op.py [--device cpu|cuda] [--calls 2000]

On tiny inputs (batch 1, 8 channels, 8 steps, d_state 1) the compute is negligible, so the time per call
is the host's cost of each path: the custom op (``torch.library``; what torch.compile traces) and its
eager twin (the ``autograd.Function`` that plain eager calls use). CPU: the torch backend; CUDA: Triton.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
from host_dispatch import per_call_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    scan = importlib.import_module("vmamba.ops.selective_scan")
    dev = torch.device(args.device)
    backend = "triton" if dev.type == "cuda" else "torch"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    shapes = ((1, 8, 8), (1, 8, 8), (8, 1), (1, 2, 1, 8), (1, 2, 1, 8), (8,), (8,))
    leaves = [torch.randn(*s, generator=g).to(dev).requires_grad_() for s in shapes]
    with torch.no_grad():
        leaves[2].copy_(-leaves[2].abs())
    grad = torch.ones(1, 8, 8, device=dev)
    save = scan.saves_states(scan.ScanBackend(backend), *leaves)

    def eager():
        scan.selective_scan(*leaves, backend=backend).backward(grad)

    def custom_op():
        scan._scan_fwd_op(*leaves, True, backend, save)[0].backward(grad)

    row = {"device": str(dev), "backend": backend, "torch": torch.__version__,
           "eager_twin_us": per_call_us(eager, args.calls, sync),
           "custom_op_us": per_call_us(custom_op, args.calls, sync)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()

"""Compile one configuration of the plain selective scan's kernels for sm_90a, without a GPU, and print
its registers, spills and SASS loops.

    PYTHONPATH=src python benchmarks/sass_scan.py bwd '{"BLOCK_D": 16, "BLOCK_T": 4}'
    PYTHONPATH=src python benchmarks/sass_scan.py fwd '{"LANES": 1, "BLOCK_D": 16}' --float32

The constants start from the d_state-16 LANES backward with the forward's saved states (or the LANES
forward) and take the JSON overrides; ``--options`` sets launch options (num_warps, maxnreg). Inputs
are bf16 unless --float32.

Triton's version decides the code. To see what the GPU machine runs, compile with its Triton: the
device has Triton 3.6, whose wheel (triton-3.6.0, cp311) is in this machine's local package files; a
virtual environment with it and this project's other packages reproduced the device's figures exactly
(session 19: 255 registers, 4 bytes of spills and a 1534-instruction loop for the stage-3 default).
Triton 3.8 compiles the same kernel to 223 registers and 1097 instructions.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import aot_kernels  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vmamba.ops.triton import selective_scan  # noqa: E402

BACKWARD = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=16,
                BLOCK_T=2, SAVE_T=16, FLIP=True, LANES=True, HAS_STATES=True, EVEN=False, HALVING=2)
FORWARD = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=16, BLOCK_T=8,
               PREFETCH=True, LANES=True, SAVE_T=0, STAGES=1, EVEN=False)
MEMORY = ("LDS", "STS", "LDL", "STL", "BAR", "SHFL", "MUFU")


def compile_variant(kind: str, overrides: dict, options: dict, bf16: bool):
    kernel = selective_scan._ss_bwd_kernel if kind == "bwd" else selective_scan._ss_fwd_kernel
    constants = aot_kernels.with_defaults(kernel, {**(BACKWARD if kind == "bwd" else FORWARD), **overrides})
    half = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "gy_ptr"} if bf16 else set()
    source = ASTSource(kernel, aot_kernels.signature(kernel, constants, half), constants,
                       aot_kernels.divisibility(kernel, aot_kernels.DIVISIBLE_INTS))
    return triton.compile(source, target=aot_kernels.HOPPER, options=options)


def opcode_counts(sass: str) -> dict:
    """Counts of the shared / local memory, barrier, shuffle and MUFU instructions in the whole kernel."""
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    return {op: n for op, n in sorted(ops.items()) if op.split(".")[0] in MEMORY}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("fwd", "bwd"))
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON constants over the LANES defaults")
    parser.add_argument("--options", default='{"num_warps": 1}', help="JSON launch options")
    parser.add_argument("--float32", action="store_true", help="float32 inputs instead of bf16")
    args = parser.parse_args()
    options = json.loads(args.options)
    compiled = compile_variant(args.kind, json.loads(args.overrides), options, not args.float32)
    sass = aot_kernels.disassemble(compiled.asm["cubin"])
    report = {"triton": triton.__version__, **aot_kernels.resources(compiled.asm["ptx"], options),
              "shared_bytes": compiled.metadata.shared, "loops": aot_kernels.loops_in(sass),
              "memory_and_special": opcode_counts(sass)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

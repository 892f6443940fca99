"""Compile one configuration of the plain selective scan's kernels for sm_90a, without a GPU, and print
its registers, spills and SASS loops.

    PYTHONPATH=src python benchmarks/sass_scan.py bwd '{"BLOCK_D": 16, "BLOCK_T": 4}'
    PYTHONPATH=src python benchmarks/sass_scan.py fwd '{"LANES": 1, "BLOCK_D": 16}' --float32
    PYTHONPATH=src python benchmarks/sass_scan.py packed '{"L": 49, "CG": 768, "BLOCK": 512}'
    PYTHONPATH=src python benchmarks/sass_scan.py rows '{"L": 196, "CG": 384, "LANES_T": 64, "BLOCK_D": 1,
        "STEPS": 4, "ROW_BLOCKS": 32, "STAGES": 3, "ALIGN": 4}'
    PYTHONPATH=src python benchmarks/sass_scan.py core_fwd '{"BLOCK_T": 16, "FAST": 1}'

The constants start from the d_state-16 LANES backward with the forward's saved states (or the LANES
forward, for ``packed`` the d_state-1 packed-row forward at L 196, for ``rows`` the d_state-1 whole-row
backward at L 49 (or "L": 196, "CG": 384), capped at 128 registers, for ``core_fwd`` the fused core's
stage-1 forward of VMamba-T[s1l8] keeping states) and take the JSON overrides;
``--options`` sets launch options (num_warps, maxnreg). Inputs are bf16 unless --float32. The packed
forward has no loop: it reports instructions a thread and an element (NOPs left out).

Triton's version decides the code. To see what the GPU machine runs, compile with its Triton: the
device has Triton 3.6, whose wheel (triton-3.6.0, cp311) is in this machine's local package files; a
virtual environment with it and this project's other packages reproduced the device's figures exactly
(session 19: 255 registers, 4 bytes of spills and a 1534-instruction loop for the stage-3 default).
Triton 3.8 compiles the same kernel to 223 registers and 1097 instructions. Install that wheel last and
with ``--no-deps``: torch 2.14.1 requires Triton 3.8, so a later ``pip install`` of a package that pulls
torch's requirements in (timm) silently upgrades it back. The report's "triton" field says which one ran.
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

from vmamba.ops.triton import selective_scan, selective_scan_packed, selective_scan_rows, ss2d_core  # noqa: E402

BACKWARD = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=16,
                BLOCK_T=2, SAVE_T=16, FLIP=True, LANES=True, HAS_STATES=True, EVEN=False, HALVING=2)
FORWARD = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=16, BLOCK_T=8,
               PREFETCH=True, LANES=True, SAVE_T=0, STAGES=1, EVEN=False)
PACKED = dict(L=196, CG=384, R=10, BLOCK=2048, V=8, BC_ALIGN=1, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True)
ROWS = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, LANES_T=8, BLOCK_D=4, STEPS=8, ROW_BLOCKS=16,
            STAGES=1, ALIGN=1)
# the fused core's forward at VMamba-T[s1l8] stage 1 keeping states: Δ in the kernel, 32-step chunks, 3 stages
CORE_FORWARD = dict(R=6, BLOCK_D=32, BLOCK_T=32, PREFETCH=False, DELTA_IN=False, SAVE_T=4, LANES=False, STAGES=3)
MEMORY = ("LDS", "STS", "LDL", "STL", "BAR", "SHFL", "MUFU")


def compile_variant(kind: str, overrides: dict, options: dict, bf16: bool):
    if kind == "rows":
        return compile_rows(overrides, options, bf16)
    if kind == "core_fwd":
        kernel = ss2d_core._core_fwd_kernel
        constants = aot_kernels.with_defaults(kernel, aot_kernels.core(**{**CORE_FORWARD, **overrides}))
        source = ASTSource(kernel, aot_kernels.signature(kernel, constants, bf16), constants,
                           aot_kernels.divisibility(kernel, aot_kernels.DIVISIBLE_INTS))
        return triton.compile(source, target=aot_kernels.HOPPER, options=options)
    kernel = selective_scan._ss_bwd_kernel if kind == "bwd" else selective_scan._ss_fwd_kernel
    constants = aot_kernels.with_defaults(kernel, {**(BACKWARD if kind == "bwd" else FORWARD), **overrides})
    half = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "gy_ptr"} if bf16 else set()
    source = ASTSource(kernel, aot_kernels.signature(kernel, constants, half), constants,
                       aot_kernels.divisibility(kernel, aot_kernels.DIVISIBLE_INTS))
    return triton.compile(source, target=aot_kernels.HOPPER, options=options)


def compile_rows(overrides: dict, options: dict, bf16: bool):
    """The whole-row backward as the launcher specialises it at VMamba-T[s1l8]'s shapes (batch 128, 4
    groups; the overrides "L" and "CG" pick the stage, default stage 4): unit strides constant, and the
    integers that are multiples of 16 there declared so. bf16: the inputs, du and ddelta (the upstream
    gradient stays float32)."""
    kernel = selective_scan_rows._rows_bwd_kernel
    overrides = dict(overrides)
    length, cg = overrides.pop("L", 49), overrides.pop("CG", 768)
    constants = {**ROWS, **overrides}
    unit = {name: 1 for name in ("sg_l", "su_l", "sdt_l", "sA_d", "sB_l", "sC_l", "sD", "sbias")}
    programs = -(-cg // (constants["BLOCK_D"] * constants["ROW_BLOCKS"]))
    values = {"L": length, "CG": cg, "KC": 4 * cg, "sg_b": 4 * cg * length, "sg_d": length,
              "su_b": 4 * cg * length, "su_d": length, "sdt_b": 4 * cg * length, "sdt_d": length,
              "sB_b": 4 * length, "sB_k": length, "sC_b": 4 * length, "sC_k": length,
              "sdu_b": 4 * cg * length, "sdu_d": length, "sdB_b": 4 * programs * length,
              "sdB_k": programs * length, "sdB_blk": length}
    half = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"} if bf16 else set()
    sig = aot_kernels.signature(kernel, {**constants, **unit}, half)
    sig.update({name: "constexpr" for name in unit})
    divisible = {name for name, value in values.items() if value % 16 == 0}
    source = ASTSource(kernel, sig, {**constants, **unit}, aot_kernels.divisibility(kernel, divisible))
    return triton.compile(source, target=aot_kernels.HOPPER, options=options)


def compile_packed(overrides: dict, options: dict, bf16: bool):
    """The packed-row forward as the launcher specialises it at the VMamba shapes: unit strides constant,
    the channel count and the batch strides (and B's and C's where L is a multiple of 16) multiples of 16.
    Without these Triton 3.6 picks a one-element load layout and twice the instructions (session 20)."""
    kernel = selective_scan_packed._packed_fwd_kernel
    unit = {"sA_d": 1, "sB_l": 1, "sC_l": 1, "sD": 1, "sbias": 1}
    constants = {**PACKED, **overrides, **unit}
    sig = aot_kernels.signature(kernel, constants, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"} if bf16 else set())
    sig.update({name: "constexpr" for name in unit})
    divisible = {"KC", "su_b", "sdt_b", "sy_b"} | ({"sB_b", "sC_b"} if constants["L"] % 16 == 0 else set())
    source = ASTSource(kernel, sig, constants, aot_kernels.divisibility(kernel, divisible))
    options = {"num_warps": max(1, min(16, constants["BLOCK"] // constants["V"] // 32)), **options}
    return triton.compile(source, target=aot_kernels.HOPPER, options=options), constants["V"], options


def instruction_counts(sass: str) -> collections.Counter:
    return collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass))


def opcode_counts(sass: str) -> dict:
    """Counts of the shared / local memory, barrier, shuffle and MUFU instructions in the whole kernel."""
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    return {op: n for op, n in sorted(ops.items()) if op.split(".")[0] in MEMORY}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("fwd", "bwd", "packed", "rows", "core_fwd"))
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON constants over the defaults")
    parser.add_argument("--options", default=None, help='JSON launch options (default {"num_warps": 1}; '
                                                        'packed: a warp per 32 vectors; rows: "maxnreg": 128 too)')
    parser.add_argument("--float32", action="store_true", help="float32 inputs instead of bf16")
    args = parser.parse_args()
    options = json.loads(args.options) if args.options else {}
    bf16 = not args.float32
    overrides = {"FAST": 3 if bf16 else 1, **json.loads(args.overrides)}  # as fast_math() picks on the GPU
    report = {"triton": triton.__version__}
    if args.kind == "packed":  # one straight run of code, no loop: counts per element instead
        compiled, vector, options = compile_packed(overrides, options, bf16)
        sass = aot_kernels.disassemble(compiled.asm["cubin"])
        counts = instruction_counts(sass)
        total = sum(n for op, n in counts.items() if op != "NOP")
        report.update(instructions=total, per_element=total / vector, top=counts.most_common(16),
                      layout_conversions=compiled.asm["ttgir"].count("ttg.convert_layout"))
    else:
        options = {"num_warps": 1, **({"maxnreg": 128} if args.kind == "rows" else {}), **options}
        compiled = compile_variant(args.kind, overrides, options, bf16)
        sass = aot_kernels.disassemble(compiled.asm["cubin"])
        report["loops"] = aot_kernels.loops_in(sass)
    report.update(aot_kernels.resources(compiled.asm["ptx"], options), shared_bytes=compiled.metadata.shared,
                  memory_and_special=opcode_counts(sass))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

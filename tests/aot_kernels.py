"""Compile the Triton kernels for a Hopper GPU (sm_90a) without one: run as a script by test_triton_aot.py.

Triton compiles ahead of time for a named target with its bundled ptxas, so the CUDA-only branches
that the interpreter never takes (the inline-PTX fast math, the int64 offsets, saved states, the
register cap) are compiled here for the variants the models use. Prints one JSON line per variant.

    python tests/aot_kernels.py [--resources] [--sass] [--candidates]

``--resources`` adds each kernel's registers per thread and spill bytes, from ptxas -v; ``--sass``
adds the length of each loop in SASS instructions and its most frequent opcodes, from the bundled
cuobjdump (the time-step loops of the scans: divide by BLOCK_T for instructions per step). Triton's
version here may differ from the GPU machine's, so treat both as indicative. ``--candidates``
compiles the plain scan's defaults and sweep candidates at the shapes' run-time specialisations
instead (BENCHMARKS.md, session 10's static table).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vmamba.ops.triton import (  # noqa: E402
    layer_norm,
    partial_sums,
    selective_scan,
    selective_scan_packed,
    selective_scan_rows,
    ss2d_core,
)

HOPPER = GPUTarget("cuda", 90, 32)
FLOATS = {"inv_h", "eps"}
# the map-sized tensors of the fused core in bf16 (as under autocast), everything else float32
BF16 = {"u_ptr", "xp_ptr", "y_ptr", "dl_ptr", "gy_ptr", "du_ptr", "ddt_ptr"}


# the plain scan's newer constexprs, where a variant leaves them out: (T, D, N) tiles, no declared alignment,
# a program per channel block
SCAN_DEFAULTS = {"FLAT": False, "ALIGN": 1, "PERSIST": False}


def with_defaults(kernel, constants: dict) -> dict:
    """``constants`` with SCAN_DEFAULTS for the kernel's constexprs it leaves out."""
    return {**{k: v for k, v in SCAN_DEFAULTS.items() if k in kernel.arg_names}, **constants}


def signature(kernel, constants: dict, bf16: bool | set[str]) -> dict:
    """Argument types; ``bf16``: the map-sized tensors (BF16) in bf16, or the named pointers."""
    bf16_names = BF16 if bf16 is True else bf16 or set()
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in bf16_names else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def divisibility(kernel, divisible_ints: set[str]) -> dict:
    """What Triton's launcher specialises at run time: fresh tensors are 16-byte aligned, and so are
    the named integers (channel counts and row strides of the VMamba shapes are multiples of 16)."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params))
            if not param.is_constexpr and (name.endswith("_ptr") or name in divisible_ints)}


# integer arguments that are multiples of 16 at the VMamba shapes (C = 96·2^i, M = batch·H·W)
DIVISIBLE_INTS = {"M", "C", "stride_xm", "stride_dym", "stride_xk"}


def core(**overrides):
    base = dict(R=6, N=1, NSEQ=2, HAS_D=True, SOFTPLUS=True, BLOCK_D=32, BLOCK_N=1, FAST=True, WIDE=False, STAGES=1)
    return {**base, **overrides}


VARIANTS = [
    ("core_fwd d_state 1, in-kernel Δ, saving states", ss2d_core._core_fwd_kernel,
     core(BLOCK_T=8, PREFETCH=True, DELTA_IN=False, SAVE_T=4, LANES=False), {"num_warps": 1}, True),
    ("core_fwd d_state 1, Δ from GEMM, int64 offsets", ss2d_core._core_fwd_kernel,
     core(R=24, BLOCK_D=64, BLOCK_T=8, PREFETCH=True, DELTA_IN=True, SAVE_T=0, WIDE=True, LANES=False),
     {"num_warps": 1}, True),
    ("core_fwd d_state 1, Δ from GEMM, 32-step chunks, 3 pipeline stages", ss2d_core._core_fwd_kernel,
     core(BLOCK_T=32, PREFETCH=False, DELTA_IN=True, SAVE_T=0, LANES=False, STAGES=3), {"num_warps": 1}, True),
    ("core_fwd d_state 16", ss2d_core._core_fwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=16, BLOCK_T=16, PREFETCH=True, DELTA_IN=False, SAVE_T=16, LANES=False),
     {"num_warps": 8},
     False),
    ("core_fwd d_state 16, channel lanes, saving states", ss2d_core._core_fwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=4, PREFETCH=True, DELTA_IN=False, SAVE_T=16, LANES=True),
     {"num_warps": 1}, False),
    ("core_fwd d_state 16, channel lanes, Δ from GEMM", ss2d_core._core_fwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=4, PREFETCH=True, DELTA_IN=True, SAVE_T=0, LANES=True),
     {"num_warps": 1}, False),
    ("core_fwd d_state 16, 64 channel lanes on 2 warps, Δ from GEMM, capped at 128 registers (default inference)",
     ss2d_core._core_fwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=64, BLOCK_T=4, PREFETCH=True, DELTA_IN=True, SAVE_T=0, LANES=True),
     {"num_warps": 2, "maxnreg": 128}, False),
    ("core_bwd d_state 1, saved states, register cap", ss2d_core._core_bwd_kernel,
     core(BLOCK_T=4, SAVE_T=4, HAS_STATES=True, FLIP=False, LANES=False, PREFETCH=False),
     {"num_warps": 1, "maxnreg": 128}, True),
    ("core_bwd d_state 1, saved states, register cap, FLIP", ss2d_core._core_bwd_kernel,
     core(BLOCK_T=4, SAVE_T=4, HAS_STATES=True, FLIP=True, LANES=False, PREFETCH=False),
     {"num_warps": 1, "maxnreg": 80}, True),
    ("core_bwd d_state 1, saved states, register cap, FLIP, prefetch", ss2d_core._core_bwd_kernel,
     core(BLOCK_T=4, SAVE_T=4, HAS_STATES=True, FLIP=True, LANES=False, PREFETCH=True),
     {"num_warps": 1, "maxnreg": 96}, True),
    ("core_bwd d_state 1, saved states, FLIP, 3 pipeline stages", ss2d_core._core_bwd_kernel,
     core(BLOCK_T=4, SAVE_T=4, HAS_STATES=True, FLIP=True, LANES=False, PREFETCH=False, STAGES=3),
     {"num_warps": 1, "maxnreg": 128}, True),
    ("core_bwd d_state 1, recomputing, int64 offsets", ss2d_core._core_bwd_kernel,
     core(BLOCK_T=4, SAVE_T=4, HAS_STATES=False, WIDE=True, FLIP=False, LANES=False, PREFETCH=False),
     {"num_warps": 1}, True),
    ("core_bwd d_state 16", ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=8, BLOCK_T=16, SAVE_T=16, HAS_STATES=True, FLIP=False, LANES=False, PREFETCH=False),
     {"num_warps": 4}, False),
    ("core_bwd d_state 16, FLIP", ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=8, BLOCK_T=16, SAVE_T=16, HAS_STATES=True, FLIP=True, LANES=False, PREFETCH=False),
     {"num_warps": 4}, False),
    ("core_bwd d_state 16, channel lanes, 4-step chunks, FLIP", ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=4, SAVE_T=16, HAS_STATES=True, FLIP=True, LANES=True, PREFETCH=False),
     {"num_warps": 1}, False),
    ("core_bwd d_state 16, channel lanes, 2-step chunks, reverse adjoint scan", ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=2, SAVE_T=16, HAS_STATES=True, FLIP=False, LANES=True, PREFETCH=False),
     {"num_warps": 1}, False),
    ("core_bwd d_state 16, 16 channel lanes, 2-step chunks, FLIP, halving, capped at 128 registers (default)",
     ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=16, BLOCK_T=2, SAVE_T=16, HAS_STATES=True, FLIP=True, LANES=True, PREFETCH=False,
          HALVING=2), {"num_warps": 1, "maxnreg": 128}, False),
    ("core_bwd d_state 16, channel lanes, 2-step chunks, FLIP, dB / dC by halving shuffles",
     ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=2, SAVE_T=16, HAS_STATES=True, FLIP=True, LANES=True, PREFETCH=False,
          HALVING=2), {"num_warps": 1}, False),
    ("core_bwd d_state 3, channel lanes, dB / dC by halving shuffles", ss2d_core._core_bwd_kernel,
     core(N=3, BLOCK_N=4, BLOCK_D=32, BLOCK_T=2, SAVE_T=16, HAS_STATES=True, FLIP=True, LANES=True, PREFETCH=False,
          HALVING=2), {"num_warps": 1}, False),
    ("core_bwd d_state 16, channel lanes, 2-step chunks, recomputing", ss2d_core._core_bwd_kernel,
     core(N=16, BLOCK_N=16, BLOCK_D=32, BLOCK_T=2, SAVE_T=16, HAS_STATES=False, FLIP=True, LANES=True, PREFETCH=False),
     {"num_warps": 1}, False),
    ("selective_scan fwd", selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=16, BLOCK_N=16, BLOCK_T=16, PREFETCH=True,
          LANES=False, SAVE_T=0, STAGES=1, EVEN=False), {"num_warps": 8}, False),
    ("selective_scan fwd d_state 1, saving states", selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=16, PREFETCH=True,
          LANES=False, SAVE_T=8, STAGES=1, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan fwd d_state 16, channel lanes", selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=16, BLOCK_T=8, PREFETCH=True,
          LANES=True, SAVE_T=0, STAGES=1, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan fwd d_state 16, 16 channel lanes, capped at 168 registers (default below L 512)",
     selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=16, BLOCK_N=16, BLOCK_T=8, PREFETCH=True,
          LANES=True, SAVE_T=0, STAGES=1, EVEN=False), {"num_warps": 1, "maxnreg": 168}, False),
    ("selective_scan fwd d_state 1, packed rows of L 49 starting between vectors, bf16",
     selective_scan_packed._packed_fwd_kernel,
     dict(L=49, CG=768, R=10, BLOCK=512, V=8, BC_ALIGN=1, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True),
     {"num_warps": 2}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}),
    ("selective_scan fwd d_state 1, packed rows of L 196, float32", selective_scan_packed._packed_fwd_kernel,
     dict(L=196, CG=384, R=5, BLOCK=1024, V=4, BC_ALIGN=1, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True),
     {"num_warps": 8}, False),
    ("selective_scan fwd d_state 1, packed rows of L 196 with B and C rows 4-aligned, bf16 (default)",
     selective_scan_packed._packed_fwd_kernel,
     dict(L=196, CG=384, R=10, BLOCK=2048, V=8, BC_ALIGN=4, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True),
     {"num_warps": 8}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}),
    ("selective_scan bwd", selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=8,
          SAVE_T=8, FLIP=False, LANES=False, HAS_STATES=False, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan bwd d_state 1, saved states", selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=8,
          SAVE_T=8, FLIP=False, LANES=False, HAS_STATES=True, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan fwd d_state 1, 3 pipeline stages", selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=32, PREFETCH=0,
          LANES=False, SAVE_T=0, STAGES=3, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan fwd d_state 1, 64-step chunks, 3 pipeline stages, saving states, bf16",
     selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=64, PREFETCH=0,
          LANES=False, SAVE_T=16, STAGES=3, EVEN=False), {"num_warps": 1}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}),
    ("selective_scan bwd d_state 1, saved states, FLIP, float32", selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=8,
          SAVE_T=8, FLIP=True, LANES=False, HAS_STATES=True, STAGES=1, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan bwd d_state 1, saved states, FLIP, bf16 gradients, 16-step chunks, 3 pipeline stages",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=16,
          SAVE_T=16, FLIP=True, LANES=False, HAS_STATES=True, STAGES=3, EVEN=False), {"num_warps": 1},
     {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan bwd d_state 1, saved states, (T, D) tiles, 16 channels, 32-step chunks, bf16 gradients",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=16, BLOCK_N=1, BLOCK_T=32,
          SAVE_T=32, FLIP=True, LANES=False, HAS_STATES=True, STAGES=1, EVEN=True, FLAT=True),
     {"num_warps": 1}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan bwd d_state 1, rows aligned to 4 elements, bf16 gradients", selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=16,
          SAVE_T=16, FLIP=True, LANES=False, HAS_STATES=True, STAGES=1, EVEN=False, ALIGN=4),
     {"num_warps": 1}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan bwd d_state 1, saved states, FLIP, bf16 gradients, 16 channels per warp, 16-step, EVEN",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=16, BLOCK_N=1, BLOCK_T=16,
          SAVE_T=16, FLIP=True, LANES=False, HAS_STATES=True, STAGES=1, EVEN=True), {"num_warps": 1},
     {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan fwd d_state 1, programs walking channel blocks, rows aligned to 4, saving states, bf16",
     selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=32, PREFETCH=0,
          LANES=False, SAVE_T=16, STAGES=3, EVEN=False, ALIGN=4, PERSIST=True), {"num_warps": 1},
     {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}),
    ("selective_scan bwd d_state 1, programs walking channel blocks, saved states, float32",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=8,
          SAVE_T=8, FLIP=True, LANES=False, HAS_STATES=True, STAGES=2, EVEN=True, ALIGN=4, PERSIST=True),
     {"num_warps": 1}, False),
    ("selective_scan fwd d_state 1, whole rows of 256 steps, (T, D) tiles, 2 channels, rows aligned to 4, bf16",
     selective_scan._ss_fwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=2, BLOCK_N=1, BLOCK_T=256, PREFETCH=0,
          LANES=False, SAVE_T=0, STAGES=1, EVEN=False, ALIGN=4, FLAT=True), {"num_warps": 1},
     {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}),
    ("selective_scan bwd d_state 1, whole rows of up to 64 steps, 8 consecutive steps a lane (default), bf16",
     selective_scan_rows._rows_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, LANES_T=8, BLOCK_D=4, STEPS=8, ROW_BLOCKS=16,
          STAGES=1), {"num_warps": 1, "maxnreg": 128}, {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan bwd d_state 1, whole rows of up to 256 steps as 64 lanes of 4 steps on one warp, vectors, "
     "3 stages (default), bf16", selective_scan_rows._rows_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, LANES_T=64, BLOCK_D=1, STEPS=4, ROW_BLOCKS=32,
          STAGES=3, ALIGN=4), {"num_warps": 1, "maxnreg": 128},
     {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "du_ptr", "ddt_ptr"}),
    ("selective_scan bwd d_state 1, whole rows, 4 consecutive steps a lane, float32",
     selective_scan_rows._rows_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, LANES_T=16, BLOCK_D=2, STEPS=4, ROW_BLOCKS=1,
          STAGES=1), {"num_warps": 1}, False),
    ("selective_scan bwd d_state 16, channel lanes, 2-step chunks", selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=16, BLOCK_T=2,
          SAVE_T=16, FLIP=True, LANES=True, HAS_STATES=False, EVEN=False), {"num_warps": 1}, False),
    ("selective_scan bwd d_state 16, 16 channel lanes, 4-step chunks, dB / dC by halving shuffles (default)",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=16, BLOCK_N=16, BLOCK_T=4,
          SAVE_T=16, FLIP=True, LANES=True, HAS_STATES=True, EVEN=False, HALVING=2), {"num_warps": 1}, False),
    ("selective_scan bwd d_state 16, channel lanes, 2-step chunks, dB / dC by halving shuffles",
     selective_scan._ss_bwd_kernel,
     dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=16, BLOCK_T=2,
          SAVE_T=16, FLIP=True, LANES=True, HAS_STATES=False, EVEN=False, HALVING=2), {"num_warps": 1}, False),
    ("backward partial sums, three jobs", partial_sums._partial_sums_kernel,
     dict(BLOCK_P_A=16, BLOCK_N_A=64, BLOCK_P_B=128, BLOCK_N_B=32, BLOCK_P_C=1, BLOCK_N_C=32), {"num_warps": 4},
     False),
    ("delta GEMM bf16", ss2d_core._delta_gemm_kernel,
     dict(R=24, BLOCK_M=64, BLOCK_C=128, BLOCK_R=32, PRECISION="tf32"), {"num_warps": 4},
     {"xp_ptr", "w_ptr", "out_ptr"}),
    ("delta GEMM fp32, full precision", ss2d_core._delta_gemm_kernel,
     dict(R=6, BLOCK_M=64, BLOCK_C=128, BLOCK_R=16, PRECISION="ieee"), {"num_warps": 4}, False),
    ("layer_norm fwd, K=4 summed", layer_norm._fwd_kernel,
     dict(K=4, BLOCK_M=16, BLOCK_C=128, HAS_W=True, HAS_B=True, STORE_SUM=True), {"num_warps": 4}, False),
    ("layer_norm bwd", layer_norm._bwd_kernel,
     dict(BLOCK_M=16, BLOCK_C=128, HAS_W=True, HAS_B=True), {"num_warps": 4}, False),
    ("layer_norm bwd, C 768", layer_norm._bwd_kernel,
     dict(BLOCK_M=4, BLOCK_C=1024, HAS_W=True, HAS_B=True), {"num_warps": 8}, False),
]


def resources(ptx: str, options: dict) -> dict:
    """Registers per thread and spill bytes of the compiled PTX, from the bundled ptxas -v."""
    ptxas = _tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        cap = [f"--maxrregcount={options['maxnreg']}"] if options.get("maxnreg") else []
        log = subprocess.run([ptxas, "-v", "-arch=sm_90a", *cap, path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> str:
    """The kernel's SASS, from the bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


def sass_loops(cubin: bytes) -> list[dict]:
    """:func:`loops_in` the kernel's SASS."""
    return loops_in(disassemble(cubin))


def loops_in(sass: str) -> list[dict]:
    """Each loop (a backward branch) of the SASS: its length, most frequent opcodes and global memory
    instructions with their widths (LDG.E.128: 16-byte vectors; .U16: single 2-byte elements)."""
    pattern = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(pattern.match, sass.splitlines()) if m]
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            body = [op for at, op, _ in code if int(target.group(1), 16) <= at <= address]
            memory = collections.Counter(op for op in body if op.split(".")[0] in ("LDG", "STG", "LDGSTS"))
            loops.append({"instructions": len(body),
                          "top": collections.Counter(op.split(".")[0] for op in body).most_common(6),
                          "global_memory": dict(memory)})
    return loops


def scan_candidates() -> list[tuple]:
    """The plain scan's d_state-1 defaults and sweep candidates (BENCHMARKS.md, sessions 10-12)."""
    fwd = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=64, PREFETCH=0,
               LANES=False, SAVE_T=16, STAGES=3, EVEN=False)
    bwd = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ATOMIC=False, FAST=True, BLOCK_D=32, BLOCK_N=1, BLOCK_T=16,
               SAVE_T=16, FLIP=True, LANES=False, HAS_STATES=True, STAGES=3, EVEN=False)
    half_in = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr"}
    half_grads = half_in | {"du_ptr", "ddt_ptr"}
    f, b = selective_scan._ss_fwd_kernel, selective_scan._ss_bwd_kernel
    one_warp = {"num_warps": 1}
    return [
        ("fwd, bf16, 64-step, STAGES 3, bounds masks (default)", f, fwd, one_warp, half_in),
        ("fwd, bf16, same without bounds masks (EVEN)", f, {**fwd, "EVEN": True}, one_warp, half_in),
        ("fwd, fp32, same without bounds masks (default)", f, {**fwd, "EVEN": True}, one_warp, False),
        ("fwd, bf16, 16 channels per warp", f, {**fwd, "BLOCK_D": 16}, one_warp, half_in),
        ("fwd, bf16, 8 channels per warp", f, {**fwd, "BLOCK_D": 8}, one_warp, half_in),
        ("fwd, bf16, two channels per lane", f, {**fwd, "BLOCK_D": 64}, one_warp, half_in),
        # register caps: 12 one-warp programs per SM at 168 (all 1536 of stage 1 in one wave), 16 at 128;
        # they spill, and were slower on the GPU (session 11)
        ("fwd, bf16, default, cap 168 registers", f, fwd, {**one_warp, "maxnreg": 168}, half_in),
        ("fwd, fp32, bounds masks, cap 168 registers", f, fwd, {**one_warp, "maxnreg": 168}, False),
        ("fwd, bf16, default, cap 128 registers", f, fwd, {**one_warp, "maxnreg": 128}, half_in),
        ("fwd, bf16, 32-step, STAGES 3", f, {**fwd, "BLOCK_T": 32}, one_warp, half_in),
        ("bwd, bf16 gradients, 16-step, STAGES 3 (session-10 default at stage 1)", b, bwd, one_warp, half_grads),
        ("bwd, same, STAGES 1", b, {**bwd, "STAGES": 1}, one_warp, half_grads),
        ("bwd, same, cap 168 registers", b, bwd, {**one_warp, "maxnreg": 168}, half_grads),
        ("bwd, same, 16 channels per warp", b, {**bwd, "BLOCK_D": 16}, one_warp, half_grads),
        ("bwd, same, 16 channels per warp, STAGES 1, EVEN (session-11 default at stage 1)", b,
         {**bwd, "BLOCK_D": 16, "STAGES": 1, "EVEN": True}, one_warp, half_grads),
        ("bwd, same with bounds masks", b, {**bwd, "BLOCK_D": 16, "STAGES": 1}, one_warp, half_grads),
        ("bwd, same as (T, D) tiles (FLAT), no masks", b,
         {**bwd, "BLOCK_D": 16, "STAGES": 1, "EVEN": True, "FLAT": True}, one_warp, half_grads),
        ("bwd, FLAT, 32-step (default from L 2048)", b,
         {**bwd, "BLOCK_D": 16, "BLOCK_T": 32, "SAVE_T": 32, "STAGES": 1, "EVEN": True, "FLAT": True}, one_warp,
         half_grads),
        ("bwd, same, 8 channels per warp", b, {**bwd, "BLOCK_D": 8}, one_warp, half_grads),
        ("bwd, bf16 gradients, 8-step, STAGES 1", b, {**bwd, "BLOCK_T": 8, "SAVE_T": 8, "STAGES": 1}, one_warp,
         half_grads),
        # rows of L = 196 (stage 3): not multiples of 16, which is all the launcher tells apart (_rows16)
        ("bwd, bf16 gradients, 16-step, STAGES 1, rows of L 196 undeclared", b,
         {**bwd, "STAGES": 1, "_rows16": False}, one_warp, half_grads),
        ("bwd, same with the rows' alignment (4) declared (ROW_ALIGN, default)", b,
         {**bwd, "STAGES": 1, "ALIGN": 4, "_rows16": False}, one_warp, half_grads),
        ("bwd, fp32, 8-step, FLIP (session-10 default)", b, {**bwd, "BLOCK_T": 8, "SAVE_T": 8, "STAGES": 1}, one_warp,
         False),
        ("bwd, fp32, 16 channels per warp, 32-step, EVEN (default from L 512)", b,
         {**bwd, "BLOCK_D": 16, "BLOCK_T": 32, "SAVE_T": 32, "STAGES": 1, "EVEN": True}, one_warp, False),
    ]


def run_time_specialised(kernel, constants: dict, bf16) -> tuple[dict, dict, dict]:
    """(signature, constants, divisibility) as Triton's launcher specialises the stage 1-2 shapes of the
    plain scan: unit strides along L become constexpr 1; L, the channel counts and the row strides are
    multiples of 16, unless the constants say ``_rows16: False`` (L = 196: only the channel counts are)."""
    rows16 = constants.pop("_rows16", True)
    unit = {n: 1 for n in ("su_l", "sdt_l", "sB_l", "sC_l", "sg_l") if n in kernel.arg_names}
    constants = {**constants, **unit}
    sig = signature(kernel, constants, bf16)
    sig.update({n: "constexpr" for n in unit})
    per_element = {"sA_n", "sD", "sbias", "sB_n", "sC_n", "sdB_n"}
    rows = {n for n in kernel.arg_names if n.startswith("s") and not n.endswith("_l") and n not in per_element}
    divisible = DIVISIBLE_INTS | {"CG", "KC"} | (rows | {"L", "n_saved"} if rows16 else set())
    return sig, constants, divisibility(kernel, divisible)


def main() -> int:
    """Compile VARIANTS; with --candidates, scan_candidates() at the run-time specialisations instead."""
    failures = 0
    candidates = "--candidates" in sys.argv
    for name, kernel, constants, options, bf16 in scan_candidates() if candidates else VARIANTS:
        constants = with_defaults(kernel, dict(constants))
        if bf16 and constants.get("FAST") is True:
            constants["FAST"] = 3  # fast_math's flags for 2-byte inputs on the GPU
        try:
            if candidates:
                sig, constants, divisible = run_time_specialised(kernel, constants, bf16)
            else:
                sig, divisible = signature(kernel, constants, bf16), divisibility(kernel, DIVISIBLE_INTS)
            compiled = triton.compile(ASTSource(kernel, sig, constants, divisible), target=HOPPER, options=options)
            ptx = compiled.asm["ptx"]
            row = {"variant": name, "ok": True, "cubin_bytes": len(compiled.asm["cubin"]),
                   "fast_math_ptx": "lg2.approx" in ptx, "ftz_exp2_ptx": "ex2.approx.ftz.f32" in ptx,
                   "async_copies": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                   "butterfly_shuffles_ptx": ptx.count("shfl.sync.bfly")}
            if "--resources" in sys.argv:
                row.update(resources(ptx, options))
            if "--sass" in sys.argv:
                row["loops"] = sass_loops(compiled.asm["cubin"])
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            failures += 1
            row = {"variant": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

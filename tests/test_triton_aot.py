"""The CUDA-only kernel branches compile for Hopper: an ahead-of-time compile, no GPU needed.

The interpreter runs the kernels in CI but never takes their compiled-only branches (inline-PTX fast
math, register caps); ``aot_kernels.py`` compiles every variant the models use for sm_90a in a
subprocess (the interpreter flag of the other test modules must not reach it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# the variants aot_kernels.py compiles, read from its source (importing it would import Triton's
# compiler into this process)
VARIANT_NAMES = [line.split('"')[1] for line in Path(__file__).with_name("aot_kernels.py").read_text().splitlines()
                 if line.startswith('    ("')]


def test_kernels_compile_for_hopper():
    script = Path(__file__).with_name("aot_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(VARIANT_NAMES) >= 13
    assert len(rows) == len(VARIANT_NAMES), done.stdout + done.stderr
    failed = [row for row in rows if not row["ok"]]
    assert not failed, failed
    assert done.returncode == 0, done.stderr
    for row in rows:
        assert row["cubin_bytes"] > 0
        # the scan kernels take the fast softplus path (hardware log2) when compiled
        if row["variant"].startswith(("core_", "selective_scan")):
            assert row["fast_math_ptx"], row
            assert row["ftz_exp2_ptx"], row  # 2^x without ptxas's subnormal-result wrapper
    # dB / dC summed over the channel lanes by halving (HALVING): 31 shuffles a step for the 32 sums
    # instead of 5 for each, in the PTX
    by_name = {row["variant"]: row for row in rows}
    butterflies = by_name["selective_scan bwd d_state 16, channel lanes, 2-step chunks"]["butterfly_shuffles_ptx"]
    halving = by_name["selective_scan bwd d_state 16, channel lanes, 2-step chunks, dB / dC by halving "
                      "shuffles"]["butterfly_shuffles_ptx"]
    assert butterflies - halving >= 2 * (160 - 31), (butterflies, halving)

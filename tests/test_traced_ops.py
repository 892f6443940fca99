"""The ``triton_op`` registration (VMAMBA_TRITON_OP=1): torch.compile's tracing of the op bodies.

Run in a subprocess with compiled-kernel mode (the interpreter's kernels cannot be traced) on fake CUDA
tensors, so no GPU is needed: the fused-core and LayerNorm ops, forward and backward, must decompose
into Triton kernel nodes and aten ops only, with the output shapes of the opaque ops' fake
implementations. Running the traced kernels needs a GPU (tests/test_ss2d_core.py with VMAMBA_TEST_CUDA=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r'''
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from vmamba.ops import _eager, layer_norm as ln, ss2d_core as core
import vmamba.ops.triton.layer_norm as ln_kernels

ln_kernels._cuda_sm_count = lambda index: 132  # no GPU to ask
K, C, R, N = 4, 8, 2, 1

def ops(x, wx, wdt, A, D, bias, w):
    y, states = torch.ops.vmamba.ss2d_core_fwd(x, wx, wdt, A, D, bias, 2, True)
    out, mean, rstd, xsum = torch.ops.vmamba.layer_norm_fwd(y.view(K, -1, C), w, w, 1e-5, y.dtype, True)
    dx, dw, db = torch.ops.vmamba.layer_norm_bwd(out, xsum, w, mean, rstd, True)
    grads = torch.ops.vmamba.ss2d_core_bwd(y, x, wx, wdt, A, D, bias, states, 2)
    return (y, states, out, mean, xsum, dx, dw, db, *grads)

def fakes(x, wx, wdt, A, D, bias, w):
    y, states = core._core_fwd_fake(x, wx, wdt, A, D, bias, 2, True)
    out, mean, rstd, xsum = ln._fwd_fake(y.view(K, -1, C), w, w, 1e-5, y.dtype, True)
    dx, dw, db = ln._bwd_fake(out, xsum, w, mean, rstd, True)
    grads = core._core_bwd_fake(y, x, wx, wdt, A, D, bias, states, 2)
    return (y, states, out, mean, xsum, dx, dw, db, *grads)

with FakeTensorMode():
    cuda = dict(device="cuda")
    args = (torch.empty(2, 32, 32, C, **cuda), torch.empty(K, R + 2 * N, C, **cuda), torch.empty(K, C, R, **cuda),
            torch.empty(K * C, N, **cuda), torch.empty(K * C, **cuda), torch.empty(K * C, **cuda),
            torch.empty(C, **cuda))
    graph = make_fx(dispatch_functionalize(ops), tracing_mode="fake")(*args)
    traced = ops(*args)
    expected = fakes(*args)
print(json.dumps({
    "triton_op": _eager.inductor_launches_kernels(),
    "kernels": graph.code.count("triton_kernel_wrapper_functional("),
    "opaque": graph.code.count("torch.ops.vmamba"),
    "traced": [[list(t.shape), str(t.dtype)] for t in traced],
    "expected": [[list(t.shape), str(t.dtype)] for t in expected],
}))
'''


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_triton_op_bodies_trace_into_kernels():
    env = dict(os.environ, VMAMBA_TRITON_OP="1", TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["triton_op"]
    assert result["opaque"] == 0  # every op decomposed
    assert result["kernels"] == 4  # core forward, LayerNorm forward and backward, core backward
    assert result["traced"] == result["expected"]


GPU_SCRIPT = r'''
import json
import torch
import vmamba
from vmamba.ops import _eager

torch.manual_seed(0)
model = vmamba.create_model("vmamba_tiny_s1l8", dims=16, depths=[1, 1, 2, 1], num_classes=10).cuda()
model = model.to(memory_format=torch.channels_last)
x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)

def run(fn):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]

eager_out, eager_grads = run(model)
compiled_out, compiled_grads = run(torch.compile(model, fullgraph=True))
rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
print(json.dumps({"triton_op": _eager.inductor_launches_kernels(), "out": rel(compiled_out, eager_out),
                  "grads": max(rel(a, b) for a, b in zip(compiled_grads, eager_grads))}))
'''


@pytest.mark.skipif(os.environ.get("VMAMBA_TEST_CUDA", "0") != "1" or not torch.cuda.is_available()
                    or not hasattr(torch.library, "triton_op"), reason="needs VMAMBA_TEST_CUDA=1, a GPU, torch >= 2.6")
def test_compiled_triton_ops_match_eager_on_gpu():
    env = dict(os.environ, VMAMBA_TRITON_OP="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["triton_op"] and result["out"] < 1e-4 and result["grads"] < 1e-4, result

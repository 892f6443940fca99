"""Triton LayerNorm kernels and the layer_norm interface.

The kernel tests run under Triton's interpreter on the CPU, or compiled on the GPU with
VMAMBA_TEST_CUDA=1 (the ``on_device`` fixture makes their tensors there); the ``*_on_cpu`` tests check
the CPU fallback and always run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported

import vmamba.ops.layer_norm as ln  # noqa: E402
from vmamba.layers.norm import LayerNorm, LayerNorm2d  # noqa: E402
from vmamba.ops.layer_norm import layer_norm, layer_norm_sum  # noqa: E402

kernels = pytest.importorskip("vmamba.ops.triton.layer_norm")


@pytest.fixture
def on_device():
    """Tensor factories inside the test make their tensors on the kernel test device."""
    with torch.device(DEVICE):
        yield

M = 45  # not a multiple of the tile rows used below
EPS = 1e-5
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _strided_inputs(k: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """(K, M, C) with padded rows and K interleaved in memory: neither K nor M stride is C."""
    base = torch.randn(M, k, c + 3, dtype=torch.float64).to(dtype)
    return base[..., :c].transpose(0, 1)


def _params(c: int, weight: bool, bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = torch.randn(c, dtype=torch.float64) if weight else None
    b = torch.randn(c, dtype=torch.float64) if bias else None
    return w, b


def _reference(x, w, b, dy):
    """float64 LayerNorm of x.sum(0) with autograd: (out, mean, rstd, dx, dw, db)."""
    xs = x.double().requires_grad_()
    wr = w.clone().requires_grad_() if w is not None else None
    br = b.clone().requires_grad_() if b is not None else None
    s = xs.sum(0)
    out = F.layer_norm(s, (s.shape[-1],), wr, br, EPS)
    out.backward(dy)
    mean = s.detach().mean(-1)
    rstd = (s.detach().var(-1, unbiased=False) + EPS).rsqrt()
    dx = xs.grad[0]
    assert all(torch.equal(g, dx) for g in xs.grad)
    return (out.detach(), mean, rstd, dx, wr.grad if w is not None else None, br.grad if b is not None else None)


def _run_kernels(x, w, b, dy, dtype, out_dtype):
    def cast(t):
        return t.to(dtype) if t is not None else None

    out, mean, rstd, xsum = kernels.layer_norm_fwd(x, cast(w), cast(b), EPS, out_dtype, True, block_m=4)
    dx, dw, db = kernels.layer_norm_bwd(dy.to(dtype), xsum, cast(w), mean, rstd, b is not None, block_m=4,
                                        num_programs=5)  # 12 tiles: several per program, some programs short
    return out, mean, rstd, dx, dw, db


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("c", [96, 37])
def test_kernels_match_float64_reference(c, k, dtype, on_device):
    x = _strided_inputs(k, c, dtype)
    w, b = _params(c, True, True)
    dy = torch.randn(M, c, dtype=torch.float64).to(dtype).double()
    got = _run_kernels(x, w, b, dy, dtype, dtype)
    want = _reference(x, w, b, dy)
    out, mean, rstd, dx, dw, db = got
    assert out.shape == (M, c) and out.dtype == dtype and out.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (M,)
    assert dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    for name, g, r in zip(("out", "mean", "rstd", "dx", "dw", "db"), got, want):
        tol = 1e-5 if name in ("mean", "rstd") else TOL[dtype]
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("weight", [True, False])
def test_kernels_without_bias(weight, on_device):
    c, k = 37, 3
    x = _strided_inputs(k, c, torch.float32)
    w, b = _params(c, weight, False)
    dy = torch.randn(M, c, dtype=torch.float64)
    out, _, _, dx, dw, db = _run_kernels(x, w, b, dy, torch.float32, torch.float32)
    r_out, _, _, r_dx, r_dw, _ = _reference(x, w, b, dy)
    assert db is None and (dw is None) == (not weight)
    assert rel_err(out, r_out) < TOL[torch.float32]
    assert rel_err(dx, r_dx) < TOL[torch.float32]
    if weight:
        assert rel_err(dw, r_dw) < TOL[torch.float32]


def test_kernels_bfloat16_output_from_float32(on_device):
    c = 96
    x = _strided_inputs(1, c, torch.float32)
    w, b = _params(c, True, True)
    out, mean, _, _ = kernels.layer_norm_fwd(x, w.float(), b.float(), EPS, torch.bfloat16)
    r_out = _reference(x, w, b, torch.zeros(M, c, dtype=torch.float64))[0]
    assert out.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert rel_err(out, r_out) < TOL[torch.bfloat16]
    # The float32 result rounded once, within one bf16 ulp (the interpreter truncates where the GPU
    # rounds to nearest, so not bit-exact here).
    out32 = kernels.layer_norm_fwd(x, w.float(), b.float(), EPS, torch.float32)[0]
    torch.testing.assert_close(out.float(), out32, rtol=2**-7, atol=0)


def test_kernels_single_input_sum_is_a_view(on_device):
    x = _strided_inputs(1, 37, torch.float32)
    xsum = kernels.layer_norm_fwd(x, None, None, EPS, torch.float32, return_sum=True)[3]
    assert xsum.data_ptr() == x.data_ptr() and xsum.shape == (M, 37)


def test_falls_back_to_f_layer_norm_bit_identical_on_cpu():
    c = 96
    x = torch.randn(2, 5, 7, c)
    ours, torchs = LayerNorm(c), torch.nn.LayerNorm(c)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    torchs.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), torchs(x))
    assert torch.equal(layer_norm(x, ours.weight, None, 1e-6), F.layer_norm(x, (c,), ours.weight, None, 1e-6))
    assert layer_norm(x, ours.weight, ours.bias, out_dtype=torch.bfloat16).dtype == torch.bfloat16

    norm2d = LayerNorm2d(c)
    norm2d.load_state_dict(ours.state_dict())
    fmap = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm2d(fmap), torchs(x).permute(0, 3, 1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_sum_gradient_on_cpu(dtype):
    c = 37
    xs = torch.randn(3, 2, 5, c, dtype=dtype, requires_grad=True)
    w = torch.randn(c, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    out = layer_norm_sum(xs, w, b, EPS)
    assert out.shape == (2, 5, c) and out.dtype == dtype
    dy = torch.randn_like(out)
    out.backward(dy)

    ref_xs = xs.detach().double().requires_grad_()
    ref = F.layer_norm(ref_xs.sum(0), (c,), w.detach().double(), b.detach().double(), EPS)
    ref.backward(dy.double())
    assert rel_err(out, ref) < TOL[dtype]
    assert xs.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(xs.grad, ref_xs.grad) < TOL[dtype]
    assert all(torch.equal(g, xs.grad[0]) for g in xs.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_sum_gradient_is_one_tensor_viewed_k_times(dtype):
    """The routes' gradient is not written out K times (the fused core's backward reads a stride-0 view),
    in 2-byte dtypes too, where the sum runs in float32."""
    xs = torch.randn(4, 3, 6, 16, dtype=dtype, requires_grad=True)
    out = layer_norm_sum(xs, None, None, EPS)
    (grad,) = torch.autograd.grad(out, xs, torch.randn_like(out))
    assert grad.dtype == dtype and grad.stride(0) == 0


class _KernelSpy:
    """Counts how often the interface reaches the Triton kernels."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return kernels


@pytest.fixture
def forced_triton(monkeypatch, on_device):
    spy = _KernelSpy()
    monkeypatch.setattr(ln, "_FORCE_TRITON", True)
    monkeypatch.setattr(ln, "_kernels", spy)
    return spy


def test_interface_triton_path_matches_f_layer_norm(forced_triton):
    c = 37
    norm2d = LayerNorm2d(c)
    torch.nn.init.normal_(norm2d.weight)
    fmap = torch.randn(2, c, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = norm2d(fmap)
    assert forced_triton.calls == 1 and out.is_contiguous(memory_format=torch.channels_last)
    ref_map = fmap.detach().clone().requires_grad_()
    ref_w = norm2d.weight.detach().clone().requires_grad_()
    ref_b = norm2d.bias.detach().clone().requires_grad_()
    ref = F.layer_norm(ref_map.permute(0, 2, 3, 1), (c,), ref_w, ref_b, norm2d.eps)
    torch.testing.assert_close(out, ref.permute(0, 3, 1, 2))

    dy = torch.randn_like(out)
    out.backward(dy)
    assert forced_triton.calls == 2
    ref.backward(dy.permute(0, 2, 3, 1))
    torch.testing.assert_close(fmap.grad, ref_map.grad)
    torch.testing.assert_close(norm2d.weight.grad, ref_w.grad)
    torch.testing.assert_close(norm2d.bias.grad, ref_b.grad)

    calls = forced_triton.calls
    layer_norm(fmap.detach(), None, None)  # NCHW rows are strided by H*W: F.layer_norm
    assert forced_triton.calls == calls


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_interface_without_gradients_skips_autograd_function(forced_triton, no_grad, monkeypatch):
    """Inference calls the forward directly (no autograd.Function: host time), with the same result."""
    c = 24
    norm = LayerNorm2d(c)
    torch.nn.init.normal_(norm.weight)
    fmap = torch.randn(2, c, 3, 5).contiguous(memory_format=torch.channels_last)
    expected = norm(fmap)
    assert expected.grad_fn is not None  # parameters need gradients: through the autograd.Function

    def refuse(*args):
        raise AssertionError("autograd.Function used without gradients")

    monkeypatch.setattr(ln._NormEager, "apply", refuse)
    with no_grad():
        out = norm(fmap)
    assert forced_triton.calls == 2 and out.grad_fn is None
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


def test_interface_triton_sum_gradient_and_dtypes(forced_triton):
    c = 96
    xs = torch.randn(3, 2, 4, c, requires_grad=True)
    w = torch.randn(c, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(c, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer_norm_sum(xs, w, b, EPS)
    assert out.dtype == torch.bfloat16  # the autocast dtype
    out.float().sum().backward()
    assert xs.grad.dtype == torch.float32 and w.grad.dtype == b.grad.dtype == torch.bfloat16
    assert xs.grad.shape == xs.shape
    ref = F.layer_norm(xs.detach().sum(0), (c,), w.detach().float(), b.detach().float(), EPS)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert layer_norm_sum(xs, w.float(), None, EPS, torch.float16).dtype == torch.float16


def test_custom_ops_opcheck(on_device):
    c = 37
    x = _strided_inputs(3, c, torch.float32).requires_grad_()
    w = torch.randn(c, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    torch.library.opcheck(torch.ops.vmamba.layer_norm_fwd.default, (x, w, b, EPS, torch.float32, True))
    torch.library.opcheck(torch.ops.vmamba.layer_norm_fwd.default, (x[:1], None, None, EPS, torch.bfloat16, False))
    with torch.no_grad():
        out, mean, rstd, xsum = torch.ops.vmamba.layer_norm_fwd(x, w, b, EPS, torch.float32, True)
    dy = torch.randn_like(out)  # the backward op has no autograd formula: plain tensors
    torch.library.opcheck(torch.ops.vmamba.layer_norm_bwd.default, (dy, xsum, w.detach(), mean, rstd, True))


def _compiled_norms_match_f_layer_norm(grad: bool = True) -> None:
    """A LayerNorm of a route sum, then a LayerNorm, compiled fullgraph: the loss (and with ``grad`` the
    input gradient; else it runs under no_grad) match F.layer_norm's."""
    c = 37
    norm = LayerNorm(c)
    xs = torch.randn(3, 2, 5, c, requires_grad=True)

    def f(xs):
        return norm(layer_norm_sum(xs, norm.weight, norm.bias)).square().sum()

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(xs)
    ref_xs = xs.detach().clone().requires_grad_()
    ref = F.layer_norm(F.layer_norm(ref_xs.sum(0), (c,), norm.weight, norm.bias), (c,), norm.weight, norm.bias)
    torch.testing.assert_close(loss.detach(), ref.square().sum().detach())
    if grad:
        torch.testing.assert_close(torch.autograd.grad(loss, xs)[0],
                                   torch.autograd.grad(ref.square().sum(), ref_xs)[0])
    torch._dynamo.reset()


def test_compiled_training_runs_the_custom_ops(forced_triton):
    assert ln.COMPILED_NORM is ln.CompiledNorm.AUTO  # the default
    _compiled_norms_match_f_layer_norm()
    assert forced_triton.calls == 4  # two forward ops, two backward ops


def test_compiled_inference_leaves_the_norm_to_inductor(forced_triton):
    """AUTO without a gradient: the norms trace as aten ops (Inductor generates and fuses them)."""
    _compiled_norms_match_f_layer_norm(grad=False)
    assert forced_triton.calls == 0


@pytest.mark.parametrize("policy", [ln.CompiledNorm.TRITON, "triton"])
def test_compiled_norm_triton_also_in_inference(forced_triton, monkeypatch, policy):
    monkeypatch.setattr(ln, "COMPILED_NORM", policy)
    _compiled_norms_match_f_layer_norm(grad=False)
    assert forced_triton.calls == 2


@pytest.mark.parametrize("policy", [ln.CompiledNorm.INDUCTOR, "inductor"])
def test_compiled_norm_inductor_also_in_training(forced_triton, monkeypatch, policy):
    monkeypatch.setattr(ln, "COMPILED_NORM", policy)
    _compiled_norms_match_f_layer_norm()
    assert forced_triton.calls == 0


def test_backward_launch_config_follows_the_sweep():
    """The H200 sweep's choices: 16-row tiles and 4 warps; one program per tile while there are few
    tiles, 4 programs per SM over many (VMamba-T stage 1 and 3 shapes, 132 SMs)."""
    assert kernels.bwd_launch_config(128 * 56 * 56, 96, 2, 132) == (16, 128, 4, 4 * 132)
    assert kernels.bwd_launch_config(128 * 14 * 14, 384, 2, 132) == (16, 512, 4, 128 * 14 * 14 // 16)
    block_m, block_c, _, programs = kernels.bwd_launch_config(6, 768, 2, None)
    assert block_c == 1024 and programs == -(-6 // block_m) <= kernels.INTERPRETER_PROGRAMS

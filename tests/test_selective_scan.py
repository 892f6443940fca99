"""The selective-scan op: golden case, torch backend vs the sequential reference, gradients, stability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, rel_err
from torch.utils.flop_counter import FlopCounterMode

from vmamba.ops import ScanBackend, resolve_backend, selective_scan, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def random_inputs(batch, groups, per_group, length, state, dtype=torch.float32, with_d=True, with_bias=True):
    channels = groups * per_group
    u = torch.randn(batch, channels, length)
    delta = 0.5 * torch.randn(batch, channels, length)
    A = -torch.exp(0.5 * torch.randn(channels, state))
    B = torch.randn(batch, groups, state, length)
    C = torch.randn(batch, groups, state, length)
    D = torch.randn(channels) if with_d else None
    bias = (-1 + 0.5 * torch.randn(channels)) if with_bias else None
    return [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, bias)]


def run(inputs, backend, softplus=True):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    y = selective_scan(*leaves, delta_softplus=softplus, backend=backend)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_golden_op(backend, precision):
    _, g = load_golden("selective_scan_op")
    dtype = torch.float64 if precision == "float64" else torch.float32
    prefix = "" if precision == "float64" else "fp32."
    tol = 1e-10 if precision == "float64" else 1e-5
    leaves = [g[n].to(dtype).requires_grad_(True) for n in NAMES]
    y = selective_scan(*leaves, backend=backend)
    assert y.dtype == dtype
    y.sum().backward()
    assert rel_err(y, g[prefix + "out"]) < tol
    for name, leaf in zip(NAMES, leaves):
        assert rel_err(leaf.grad, g[prefix + "grad." + name]) < tol, name


SHAPES = [  # batch, K, C per group, L, N
    (2, 4, 3, 37, 4),
    (1, 1, 5, 1, 1),
    (2, 2, 3, 33, 16),
    (1, 4, 2, 129, 64),
    (1, 1, 2, 1500, 4),  # two levels of chunk recursion
    (3, 2, 1, 64, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_matches_reference_float64(shape):
    inputs = random_inputs(*shape, dtype=torch.float64)
    y_ref, g_ref = run(inputs, "reference")
    y, grads = run(inputs, "torch")
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-10
    for name, g, r in zip(NAMES, grads, g_ref):
        assert rel_err(g, r) < 1e-9, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 3, 37, 4), (1, 2, 4, 77, 16)], ids=["n4", "n16"])
def test_torch_matches_reference_dtypes(dtype, shape):
    inputs = random_inputs(*shape, dtype=dtype)
    y_ref, g_ref = run(inputs, "reference")
    y, grads = run(inputs, "torch")
    assert y.dtype == torch.float32  # state and output in float32 whatever the input dtype
    assert rel_err(y, y_ref) < 1e-5
    for name, g, r, x in zip(NAMES, grads, g_ref, inputs):
        assert g.dtype == x.dtype, name
        # Gradients come back in the input dtype: compare at that precision.
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(g, r) < tol, name


@pytest.mark.parametrize("with_d,with_bias,softplus",
                         [(False, False, True), (True, False, False), (False, True, False)])
def test_optional_inputs(with_d, with_bias, softplus):
    inputs = random_inputs(2, 2, 3, 20, 4, dtype=torch.float64, with_d=with_d, with_bias=with_bias)
    if not softplus:
        inputs[1] = inputs[1].abs()
    y_ref, g_ref = run(inputs, "reference", softplus)
    y, grads = run(inputs, "torch", softplus)
    assert rel_err(y, y_ref) < 1e-10
    for name, g, r in zip(NAMES, grads, g_ref):
        assert (g is None) == (r is None), name
        if g is not None:
            assert rel_err(g, r) < 1e-9, name


def test_gradcheck_float64():
    inputs = [t.requires_grad_(True) for t in random_inputs(1, 2, 2, 9, 3, dtype=torch.float64)]

    def fn(*args):
        return selective_scan(*args, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_non_contiguous_inputs():
    base = random_inputs(2, 2, 3, 25, 4, dtype=torch.float64)
    u = base[0].transpose(1, 2).contiguous().transpose(1, 2)
    B = base[3].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    inputs = [u, base[1], base[2], B, base[4][..., :], base[5], base[6]]
    assert not u.is_contiguous() and not B.is_contiguous()
    y_ref, _ = run(inputs, "reference")
    y, _ = run(inputs, "torch")
    assert rel_err(y, y_ref) < 1e-10


def test_long_sequence_stays_finite():
    """L = 65,536 (a 256x256 map) with realistic Δ and A: forward and backward finite and accurate."""
    batch, groups, per_group, length, state = 1, 2, 2, 65536, 16
    channels = groups * per_group
    u = torch.randn(batch, channels, length)
    delta = torch.randn(batch, channels, length)
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1)
    B = torch.randn(batch, groups, state, length)
    C = torch.randn(batch, groups, state, length)
    bias = torch.log(torch.expm1(torch.full((channels,), 0.01)))  # dt ≈ 0.01 (softplus⁻¹)
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C)]
    y = selective_scan(*leaves, D=torch.ones(channels), delta_bias=bias, backend="torch")
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # The tail of a long sequence equals a fresh scan over a short window once the state has decayed.
    window = 4096
    dt_min = F.softplus(delta[..., -window:] + bias[:, None]).sum(-1).min()
    assert dt_min > 20  # exp(-20) decay: older inputs are forgotten
    tail = selective_scan(u[..., -window:], delta[..., -window:], A, B[..., -window:], C[..., -window:],
                          D=torch.ones(channels), delta_bias=bias, backend="torch")
    assert rel_err(y.detach()[..., -100:], tail.detach()[..., -100:]) < 1e-4


def test_bad_shapes_raise():
    u, delta, A, B, C, D, bias = random_inputs(2, 4, 3, 10, 4)
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan(u, delta[..., :5], A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:5], B, C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[..., :3], C)
    with pytest.raises(ValueError, match="do not split"):
        selective_scan(u, delta, A, B[:, :-1][:, :1].expand(-1, 5, -1, -1), C)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(u, delta, A, B, C, backend="cuda-magic")


def test_backend_resolution():
    assert resolve_backend(None, torch.device("cpu")) is ScanBackend.TORCH
    assert resolve_backend("reference", torch.device("cpu")) is ScanBackend.REFERENCE
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("triton", torch.device("cpu"))


def test_flop_counter_sees_one_op():
    u, delta, A, B, C, D, bias = random_inputs(2, 4, 3, 10, 4)
    with FlopCounterMode(display=False) as counter:
        selective_scan(u, delta, A, B, C, D, bias, backend="torch")
    counts = counter.get_flop_counts()["Global"]
    scan_ops = [op for op in counts if "selective_scan" in str(op)]
    assert len(scan_ops) == 1
    assert counts[scan_ops[0]] == 9 * 2 * 10 * 12 * 4 + 2 * 12 * 10


def test_compile_fullgraph_matches_eager():
    inputs = random_inputs(2, 2, 3, 17, 4)

    def fn(u, delta, A, B, C, D, bias):
        return selective_scan(u, delta, A, B, C, D, bias) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))


def test_reference_matches_plain_recurrence():
    """The oracle itself against an independent per-channel loop in float64."""
    u, delta, A, B, C, D, bias = random_inputs(1, 2, 2, 6, 3, dtype=torch.float64)
    y = selective_scan_reference(u, delta, A, B, C, D, bias)
    for d in range(4):
        k = d // 2
        h = torch.zeros(3, dtype=torch.float64)
        for t in range(6):
            dt = F.softplus(delta[0, d, t] + bias[d])
            h = torch.exp(dt * A[d]) * h + dt * B[0, k, :, t] * u[0, d, t]
            expected = (h * C[0, k, :, t]).sum() + D[d] * u[0, d, t]
            assert abs(y[0, d, t].item() - expected.item()) < 1e-12


def test_forward_keeps_states_only_for_a_triton_backward_at_measured_d_states():
    from vmamba.ops.selective_scan import SAVE_STATES_AT, saves_states

    assert SAVE_STATES_AT == {1, 2, 16}
    small = random_inputs(1, 2, 2, 8, 1)
    vanilla = random_inputs(1, 2, 2, 8, 16)
    unmeasured = [random_inputs(1, 2, 2, 8, n) for n in (4, 64)]
    for inputs in (small, vanilla, *unmeasured):
        inputs[0].requires_grad_(True)
    assert saves_states(ScanBackend.TRITON, *small)
    assert saves_states(ScanBackend.TRITON, *vanilla)
    assert not saves_states(ScanBackend.TORCH, *small)
    assert not any(saves_states(ScanBackend.TRITON, *inputs) for inputs in unmeasured)
    with torch.no_grad():
        assert not saves_states(ScanBackend.TRITON, *small)
    assert not saves_states(ScanBackend.TRITON, *[t.detach() if t is not None else None for t in small])


def test_eager_calls_skip_the_custom_op_and_agree_with_it(monkeypatch):
    """Plain eager calls run the autograd.Function twin; torch.compile and dispatch modes (FlopCounterMode)
    see the custom op; both give the same output and gradients, with and without D / delta_bias."""
    import importlib

    scan_module = importlib.import_module("vmamba.ops.selective_scan")  # the package exports a function of that name
    calls = []
    custom_op = scan_module._scan_fwd_op
    monkeypatch.setattr(scan_module, "_scan_fwd_op", lambda *a: calls.append("custom") or custom_op(*a))
    for with_d in (True, False):
        inputs = random_inputs(2, 2, 3, 9, 2, with_d=with_d, with_bias=with_d)
        eager = run(inputs, "torch")
        assert calls == []  # eager: the autograd.Function twin
        with FlopCounterMode(display=False) as counter:
            run(inputs, "torch")
        assert calls == ["custom"] and counter.get_total_flops() > 0
        calls.clear()
        torch._dynamo.reset()
        compiled_scan = torch.compile(lambda *t: selective_scan(*t, backend="torch"), backend="aot_eager",
                                      fullgraph=True)
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
        y = compiled_scan(*leaves)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        (y * weights).sum().backward()
        torch._dynamo.reset()
        assert calls and set(calls) == {"custom"}  # traced: the custom op
        calls.clear()
        assert rel_err(y.detach(), eager[0]) < 1e-6
        for leaf, grad in zip(leaves, eager[1]):
            assert (leaf is None) == (grad is None)
            if leaf is not None:
                assert rel_err(leaf.grad, grad) < 1e-6

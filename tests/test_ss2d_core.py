"""Fused SS2D core against the float64 composition (routes → projections → reference scan → pixels).

Runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1) at small shapes; with
VMAMBA_TEST_CUDA=1 on a CUDA machine it runs the compiled kernels.
"""

import pytest
from conftest import triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported
pytest.importorskip("triton")

import torch  # noqa: E402

from vmamba.ops import ScanMode  # noqa: E402
from vmamba.ops.selective_scan_ref import selective_scan_reference  # noqa: E402
from vmamba.ops.ss2d_core import ss2d_core  # noqa: E402


def _route_orders(mode: ScanMode, height: int, width: int) -> list[torch.Tensor]:
    """For each route, the pixel index visited at each step."""
    rows = torch.arange(height * width)
    cols = rows.view(height, width).t().reshape(-1)
    if mode is ScanMode.UNIDI:
        return [rows]
    if mode is ScanMode.BIDI:
        return [rows, rows.flip(0)]
    return [rows, cols, rows.flip(0), cols.flip(0)]


def _composition(x, x_proj_weight, dt_projs_weight, A, D, bias, mode):
    """Per route: gather the route, project, scan (float64 reference), scatter back to pixels."""
    batch, height, width, channels = x.shape
    rank = dt_projs_weight.shape[2]
    state = A.shape[1]
    pixels = x.reshape(batch, height * width, channels)
    outs = []
    for k, order in enumerate(_route_orders(mode, height, width)):
        seq = pixels[:, order].transpose(1, 2)  # (B, C, L)
        proj = torch.einsum("oc,bcl->bol", x_proj_weight[k], seq)
        dt_low, B, C = proj.split([rank, state, state], dim=1)
        delta = torch.einsum("cr,brl->bcl", dt_projs_weight[k], dt_low)
        sl = slice(k * channels, (k + 1) * channels)
        y = selective_scan_reference(seq, delta, A[sl], B[:, None], C[:, None],
                                     None if D is None else D[sl], bias[sl], True)
        out = torch.empty_like(y)
        out[:, :, order] = y
        outs.append(out.transpose(1, 2).reshape(batch, height, width, channels))
    return torch.stack(outs)


def _params(mode, channels, rank, state, seed, with_d=True):
    g = torch.Generator().manual_seed(seed)
    routes = mode.num_routes
    x_proj_weight = 0.4 * torch.randn(routes, rank + 2 * state, channels, generator=g)
    dt_projs_weight = 0.5 * torch.randn(routes, channels, rank, generator=g)
    A = -torch.exp(0.5 * torch.randn(routes * channels, state, generator=g))
    D = torch.randn(routes * channels, generator=g) if with_d else None
    bias = 0.5 * torch.randn(routes * channels, generator=g) - 1.0
    return x_proj_weight, dt_projs_weight, A, D, bias


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = [
    (ScanMode.CROSS2D, 2, 5, 7, 6, 2, 1, True),
    (ScanMode.CROSS2D, 1, 4, 3, 40, 3, 4, True),  # several channel blocks, d_state 4
    (ScanMode.CROSS2D, 1, 3, 3, 5, 1, 16, False),
    (ScanMode.BIDI, 2, 3, 6, 6, 2, 1, True),
    (ScanMode.UNIDI, 1, 5, 4, 6, 2, 2, True),
]


@pytest.mark.parametrize("mode,batch,height,width,channels,rank,state,with_d", CASES)
def test_fused_core_matches_composition(mode, batch, height, width, channels, rank, state, with_d):
    g = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(batch, height, width, channels, generator=g)
    params = _params(mode, channels, rank, state, seed=7, with_d=with_d)
    grad = torch.randn(mode.num_routes, batch, height, width, channels, generator=g)

    ref_inputs = [t.double().requires_grad_() if t is not None else None for t in (x, *params)]
    ref = _composition(*ref_inputs, mode)
    ref.backward(grad.double())

    inputs = [t.to(DEVICE).requires_grad_() if t is not None else None for t in (x, *params)]
    out = ss2d_core(*inputs, mode)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out.cpu(), ref.detach()) < 1e-5
    out.backward(grad.to(DEVICE))
    names = ["x", "x_proj_weight", "dt_projs_weight", "A", "D", "delta_bias"]
    for name, ours, theirs in zip(names, inputs, ref_inputs):
        if ours is None:
            continue
        assert _rel(ours.grad.cpu(), theirs.grad) < 2e-5, name


def test_fused_core_without_gradients_matches(monkeypatch):
    """Inference calls the forward directly (no autograd.Function), with the same output."""
    from vmamba.ops import ss2d_core as core_module

    mode = ScanMode.CROSS2D
    x = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    params = [t.to(DEVICE).requires_grad_() for t in _params(mode, 6, 2, 1, seed=4)]
    expected = ss2d_core(x, *params, mode)
    assert expected.grad_fn is not None

    def refuse(*args):
        raise AssertionError("autograd.Function used without gradients")

    monkeypatch.setattr(core_module._CoreEager, "apply", refuse)
    with torch.inference_mode():
        out = ss2d_core(x, *params, mode)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("config", [{"DELTA_GEMM": 1}, {"DELTA_GEMM": 1, "PREFETCH": 1, "BLOCK_T": 8},
                                    {"PREFETCH": 1, "BLOCK_D": 16}, {"PREFETCH": 0, "STAGES": 3, "BLOCK_T": 4}])
def test_forward_kernel_options_agree(config):
    """Δ read from the batched GEMM instead of computed in-kernel, and the prefetching loop, give the
    same routes as the default forward."""
    from vmamba.ops.ss2d_core import _projections
    from vmamba.ops.triton.ss2d_core import ss2d_scan_fwd

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 7, 40, generator=g).to(DEVICE)
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 40, 3, 2, seed=4))
    u, xp = _projections(x, wx)
    default, _ = ss2d_scan_fwd(u, xp, wdt, A, D, bias, 5, 7, 2)
    other, _ = ss2d_scan_fwd(u, xp, wdt, A, D, bias, 5, 7, 2, config=config)
    assert _rel(other, default) < 1e-6


@pytest.mark.parametrize(("state", "config"), [(1, None), (1, {"BLOCK_T": 16, "PREFETCH": 1}), (4, None),
                                               (1, {"BLOCK_T": 8, "PREFETCH": 0, "STAGES": 3})])
def test_states_saved_by_the_forward_replace_the_backward_first_pass(state, config):
    """The forward's saved chunk states (taken at sub-chunk steps when its chunks are longer) give the
    backward the same gradients as its own first pass, and leave the outputs unchanged."""
    from vmamba.ops.ss2d_core import _projections
    from vmamba.ops.triton import ss2d_core as k

    g = torch.Generator().manual_seed(5)
    height, width, channels = 3, 5, 12  # 15 steps: the last chunk is partial
    x = torch.randn(2, height, width, channels, generator=g).to(DEVICE)
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, channels, 3, state, seed=5))
    u, xp = _projections(x, wx)
    args = (u, xp, wdt, A, D, bias, height, width, 2)
    y, none = k.ss2d_scan_fwd(*args, config=config)
    y_saving, states = k.ss2d_scan_fwd(*args, config=config, save_states=True)
    # identical arithmetic, but two compiled variants may contract multiply-adds differently (the
    # LANES forward at d_state 4 differs in the last bits on an H200): rounding-level agreement
    assert none.numel() == 0 and _rel(y_saving, y) < 1e-6
    assert tuple(states.shape) == k.saved_states_shape(2, 4, channels, height * width, state)
    gy = torch.randn(4, 2, height * width, channels, generator=g).to(DEVICE)
    recomputed = k.ss2d_scan_bwd(gy, *args)
    saved = k.ss2d_scan_bwd(gy, *args, states=states)
    for ours, theirs in zip(saved, recomputed):
        assert _rel(ours, theirs) < 1e-5
    with pytest.raises(ValueError, match="states must be"):
        k.ss2d_scan_bwd(gy, *args, states=states[:1])


@pytest.mark.parametrize("with_states", [False, True])
def test_backward_prefetch_agrees(with_states):
    """Loading the chunk before while the current one is computed (backward config PREFETCH) gives the
    gradients of the plain loop, with the forward's saved states and with the backward's own first pass."""
    from vmamba.ops.ss2d_core import _projections
    from vmamba.ops.triton import ss2d_core as k

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, 12, generator=g).to(DEVICE)  # 15 steps: the first chunk walked is partial
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 12, 2, 1, seed=8))
    u, xp = _projections(x, wx)
    args = (u, xp, wdt, A, D, bias, 3, 5, 2)
    _, states = k.ss2d_scan_fwd(*args, save_states=True)
    gy = torch.randn(4, 2, 15, 12, generator=g).to(DEVICE)
    saved = states if with_states else None
    plain = k.ss2d_scan_bwd(gy, *args, states=saved, config={"PREFETCH": 0})
    prefetching = k.ss2d_scan_bwd(gy, *args, states=saved, config={"PREFETCH": 1})
    pipelined = k.ss2d_scan_bwd(gy, *args, states=saved, config={"PREFETCH": 0, "STAGES": 3})  # Triton's pipeliner
    for ours in (prefetching, pipelined):
        for a, b in zip(ours, plain):
            assert _rel(a, b) < 1e-6


def _scan_case(state, width, rank, seed):
    """Arguments of the core's scan kernels for one 3 × width map of 12 channels, and a gradient of its
    four routes' outputs."""
    from vmamba.ops.ss2d_core import _projections

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, width, 12, generator=g).to(DEVICE)
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 12, rank, state, seed=seed))
    u, xp = _projections(x, wx)
    gy = torch.randn(4, 1, 3 * width, 12, generator=g).to(DEVICE)
    return (u, xp, wdt, A, D, bias, 3, width, 2), gy


@pytest.mark.parametrize(("state", "lanes"), [(1, 0), (4, 0), (4, 1)])
def test_flipped_adjoint_scan_agrees(state, lanes):
    """The backward's adjoint scan as a forward scan of the time-flipped chunk (config FLIP, the
    default) gives the gradients of the reverse associative scan, in both tile layouts."""
    from vmamba.ops.triton import ss2d_core as k

    args, gy = _scan_case(state, width=5, rank=2, seed=7)
    layout = {"LANES": 1, "BLOCK_D": 16, "BLOCK_T": 4, "num_warps": 1} if lanes else {"LANES": 0}
    reverse_scan = k.ss2d_scan_bwd(gy, *args, config={**layout, "FLIP": 0})
    flipped = k.ss2d_scan_bwd(gy, *args, config={**layout, "FLIP": 1})
    for a, b in zip(flipped, reverse_scan):
        assert _rel(a, b) < 1e-6


def test_wide_offsets_path_agrees(monkeypatch):
    """The int64 pixel-offset variant (maps whose offsets could pass 2**31) computes the same thing."""
    from vmamba.ops.ss2d_core import _projections
    from vmamba.ops.triton import ss2d_core as k

    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 6, 16, generator=g).to(DEVICE)
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 16, 2, 1, seed=6))
    u, xp = _projections(x, wx)
    args = (u, xp, wdt, A, D, bias, 4, 6, 2)
    gy = torch.randn(4, 1, 24, 16, generator=g).to(DEVICE)
    narrow = (k.ss2d_scan_fwd(*args)[0], *k.ss2d_scan_bwd(gy, *args))
    monkeypatch.setattr(k, "_wide", lambda *_: True)
    wide = (k.ss2d_scan_fwd(*args)[0], *k.ss2d_scan_bwd(gy, *args))
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def test_maps_too_large_for_the_pixel_mapping_are_refused():
    from vmamba.ops.triton import ss2d_core as k

    pixels = k.MAX_PIXELS
    u = torch.zeros(1, 1, 1, device=DEVICE).expand(1, pixels, 1)
    xp = torch.zeros(1, 1, 1, 3, device=DEVICE).expand(1, pixels, 2, 3)
    wdt, A, D = torch.zeros(2, 1, 1, device=DEVICE), -torch.ones(2, 1, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="fewer than"):
        k.ss2d_scan_fwd(u, xp, wdt, A, D, D, 2048, 2048, 2)


def test_fused_core_sum_gradient_is_a_broadcast_view():
    """The merge is a sum over routes: its gradient reaches the kernel as a stride-0 view, no copies."""
    mode = ScanMode.CROSS2D
    x = torch.randn(1, 4, 5, 6)
    params = _params(mode, 6, 2, 1, seed=3)
    ref_inputs = [t.double().requires_grad_() for t in (x, *params)]
    _composition(*ref_inputs, mode).sum(0).pow(2).sum().backward()
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, *params)]
    ss2d_core(*inputs, mode).sum(0).pow(2).sum().backward()
    for ours, theirs in zip(inputs, ref_inputs):
        assert _rel(ours.grad.cpu(), theirs.grad) < 2e-5


def test_fused_core_bf16_close_to_fp32():
    """bf16 maps (float32 parameters, as under autocast): outputs and every gradient stay within bf16
    rounding of the float32 run (the backward's Δ comes from a bf16 GEMM, the forward's is float32)."""
    mode = ScanMode.CROSS2D
    x = torch.randn(1, 4, 4, 8)
    params = _params(mode, 8, 2, 1, seed=5)
    grad = torch.randn(4, 1, 4, 4, 8)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [x.to(DEVICE, dtype).clone().requires_grad_()]
        inputs += [p.to(DEVICE).clone().requires_grad_() for p in params]
        out = ss2d_core(*inputs, mode)
        assert out.dtype == dtype
        out.backward(grad.to(DEVICE, dtype))
        results.append((out.detach().float().cpu(), [t.grad.float().cpu() for t in inputs]))
    (full, full_grads), (half, half_grads) = results
    assert _rel(half, full) < 2e-2
    for name, g_half, g_full in zip(["x", "x_proj_weight", "dt_projs_weight", "A", "D", "delta_bias"],
                                    half_grads, full_grads):
        assert _rel(g_half, g_full) < 3e-2, name


def test_fused_core_rejects_bad_shapes():
    params = _params(ScanMode.CROSS2D, 6, 2, 1, seed=1)
    with pytest.raises(ValueError, match="supports"):
        ss2d_core(torch.randn(1, 3, 3, 6), *params, mode=ScanMode.CASCADE2D)
    with pytest.raises(ValueError, match="routes"):
        ss2d_core(torch.randn(1, 3, 3, 6), *params, mode=ScanMode.BIDI)
    with pytest.raises(ValueError, match="B, H, W, C"):
        ss2d_core(torch.randn(3, 3, 6), *params)


@pytest.mark.parametrize("channel_first,core,gate,state", [
    (True, "v05", "none", 1),  # VMamba v2 blocks
    (False, "v0", "activated", 4),  # vanilla VMamba blocks (channel-last, gated)
])
def test_ss2d_fused_path_matches_unfused(monkeypatch, channel_first, core, gate, state):
    """The SS2D layer gives the same output and gradients through the fused core as through the
    cross_scan → selective_scan → cross_merge composition."""
    from vmamba.layers.ss2d import SS2D, SS2DConfig

    torch.manual_seed(0)
    layer = SS2D(8, SS2DConfig(d_state=state, ssm_ratio=1.5, core=core, gate=gate), channel_first).to(DEVICE)
    shape = (2, 8, 5, 6) if channel_first else (2, 5, 6, 8)
    x = torch.randn(shape, device=DEVICE)

    def run(fused):
        monkeypatch.setattr(SS2D, "_uses_fused_core", lambda self, t: fused)
        layer.zero_grad()
        xin = x.clone().requires_grad_()
        out = layer(xin)
        out.pow(2).sum().backward()
        return out.detach(), xin.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    out_ref, dx_ref, grads_ref = run(False)
    out, dx, grads = run(True)
    assert _rel(out, out_ref) < 1e-5
    assert _rel(dx, dx_ref) < 1e-5
    for name, g in grads_ref.items():
        assert _rel(grads[name], g) < 1e-5, name


def test_fused_core_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels,
    which is what torch.compile(fullgraph=True) relies on."""
    from vmamba.ops import ss2d_core as core

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 3, 4, 6, generator=g, device="cpu").to(DEVICE)
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 6, 2, 1, seed=11))
    inputs = [t.requires_grad_() for t in (x, wx, wdt, A, D, bias)]
    torch.library.opcheck(core._core_fwd, (*inputs, 2, False))
    torch.library.opcheck(core._core_fwd, (*inputs, 2, True))
    grad = torch.randn(4, 1, 3, 4, 6, generator=g).to(DEVICE)
    plain = [t.detach() for t in inputs]
    _, states = core._core_fwd(*plain, 2, True)
    for saved in (states, states[:0]):
        torch.library.opcheck(core._core_bwd, (grad, *plain, saved, 2))


def test_fused_core_only_on_cuda():
    """On CPU tensors SS2D keeps the composition (the fused core is a CUDA path)."""
    from vmamba.layers.ss2d import SS2D, SS2DConfig

    layer = SS2D(8, SS2DConfig(), channel_first=True)
    assert not layer._uses_fused_core(torch.randn(1, 8, 4, 4))


def test_eager_function_and_compiled_custom_op_agree():
    """Eager calls run the autograd.Function twin; torch.compile traces the custom ops: same numbers."""
    mode = ScanMode.CROSS2D
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 3, 4, 8, generator=g)
    params = _params(mode, 8, 2, 1, seed=12)

    def run(fn):
        inputs = [t.to(DEVICE).requires_grad_() for t in (x, *params)]
        out = fn(*inputs)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in inputs)]

    def core(*inputs):
        return ss2d_core(*inputs, mode)

    torch._dynamo.reset()
    eager = run(core)
    compiled = run(torch.compile(core, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        assert _rel(a, b) < 1e-6


def test_saved_states_path_through_autograd(monkeypatch):
    """With state saving on for every map size, outputs and gradients through ss2d_core are unchanged."""
    from vmamba.ops import ss2d_core as core

    mode = ScanMode.CROSS2D
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 5, 8, generator=g)
    params = _params(mode, 8, 2, 1, seed=13)

    def run():
        inputs = [t.to(DEVICE).requires_grad_() for t in (x, *params)]
        out = ss2d_core(*inputs, mode)
        out.square().sum().backward()
        return [out.detach(), *(t.grad for t in inputs)]

    recomputed = run()
    monkeypatch.setattr(core, "SAVE_STATES_MIN_LENGTH", 0)
    saved = run()
    for a, b in zip(saved, recomputed):
        assert _rel(a, b) < 1e-5


# (channel, state)-per-lane tiles: the default layout at d_state 1-2, compared against LANES
TILES = {"LANES": 0, "BLOCK_D": 8, "BLOCK_T": 16, "num_warps": 4}


@pytest.mark.parametrize(("state", "block_t"), [(1, 8), (4, 2), (16, 2)])
def test_lanes_forward_agrees(state, block_t):
    """The forward with one channel and all its states per lane (config LANES) gives the outputs and
    saved states of the (channel, state)-per-lane forward, including chunks shorter than the saving
    interval."""
    from vmamba.ops.ss2d_core import _projections
    from vmamba.ops.triton import ss2d_core as k

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 7, 12, generator=g).to(DEVICE)  # 21 steps: a partial last chunk
    wx, wdt, A, D, bias = (t.to(DEVICE) for t in _params(ScanMode.CROSS2D, 12, 3, state, seed=8))
    u, xp = _projections(x, wx)
    args = (u, xp, wdt, A, D, bias, 3, 7, 2)
    want_y, want_states = k.ss2d_scan_fwd(*args, config={**TILES, "DELTA_GEMM": 0}, save_states=True)
    for delta_gemm in (0, 1):
        cfg = {"LANES": 1, "BLOCK_D": 16, "BLOCK_T": block_t, "num_warps": 1, "DELTA_GEMM": delta_gemm}
        y, states = k.ss2d_scan_fwd(*args, config=cfg, save_states=True)
        assert _rel(y, want_y) < 1e-5
        assert torch.allclose(states, want_states, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("state", "block_t"), [(1, 2), (4, 4), (16, 4)])
def test_lanes_backward_agrees(state, block_t):
    """The backward with one channel and all its states per lane (config LANES), whose chunks are
    shorter than the saved-state interval, gives the (channel, state)-per-lane backward's gradients:
    with the states a forward saved, and recomputing them."""
    from vmamba.ops.triton import ss2d_core as k

    args, gy = _scan_case(state, width=7, rank=3, seed=9)  # 21 steps: partial last chunk and interval
    want = k.ss2d_scan_bwd(gy, *args, config=TILES)
    _, states = k.ss2d_scan_fwd(*args, config={**TILES, "DELTA_GEMM": 0}, save_states=True)
    cfg = {"LANES": 1, "BLOCK_D": 16, "BLOCK_T": block_t, "num_warps": 1}
    for saved in (None, states):
        got = k.ss2d_scan_bwd(gy, *args, config=cfg, states=saved)
        for name, ours, theirs in zip(("du", "ddelta", "dbc", "dA", "dD", "dbias"), got, want):
            assert _rel(ours, theirs) < 1e-5, (name, saved is None)
    with pytest.raises(ValueError, match="must divide"):
        k.ss2d_scan_bwd(gy, *args, config={**cfg, "BLOCK_T": 32})


@pytest.mark.parametrize("state", [16, 3])
def test_halving_backward_agrees(state):
    """The default d_state 3-16 backward (one warp of 32 channel lanes, or of 16 at d_state 16, dB / dC
    summed over the lanes by recursive halving: the interpreter's stand-in for its shuffles on the CPU)
    gives the (channel, state)-per-lane backward's gradients; d_state 3 pads the states to 4."""
    from vmamba.ops.triton import ss2d_core as k

    args, gy = _scan_case(state, width=5, rank=3, seed=19)
    cfg = k.core_config(12, state, 3, True, 15, 4)
    # at d_state 9-16: 16 channels, each channel's states on two lanes, halving over 16 lanes
    assert (cfg["LANES"], cfg["BLOCK_D"], cfg["num_warps"], cfg["HALVING"]) == (1, 16 if state == 16 else 32, 1, 1)
    assert k.core_config(12, state, 3, True, 196, 2).get("maxnreg") == (128 if state == 16 else None)
    want = k.ss2d_scan_bwd(gy, *args, config=TILES)
    for config in (None, {"BLOCK_D": 32}) if state == 16 else (None,):
        got = k.ss2d_scan_bwd(gy, *args, config=config)
        for name, ours, theirs in zip(("du", "ddelta", "dbc", "dA", "dD", "dbias"), got, want):
            assert _rel(ours, theirs) < 1e-5, (name, config)


def test_core_register_caps_are_its_own():
    """The core caps registers where it measured a gain (its d_state-1 and d_state-16 backwards, its d_state-16
    forward without saved states); the plain scan's caps for the same shapes (its float32 forward at L 49,
    its d_state-16 forward below L 512) do not carry over, and neither does a default cap to a tile that
    the caller's overrides change."""
    from vmamba.ops.triton import ss2d_core as k
    from vmamba.ops.triton.selective_scan import default_config

    assert default_config(768, 1, False, 49, 4)["maxnreg"] == 128
    assert default_config(384, 16, False, 196, 2)["maxnreg"] == 168
    assert "maxnreg" not in k.core_config(768, 1, 48, False, 49, 4)
    assert k.core_config(384, 16, 24, False, 196, 2)["maxnreg"] == 128
    assert "maxnreg" not in k.core_config(384, 16, 24, False, 196, 2, saving=True)
    assert k.core_config(384, 1, 24, True, 196, 2)["maxnreg"] == 128
    assert k.core_config(384, 16, 24, True, 196, 2)["maxnreg"] == 128
    # nor do the plain kernels' row packing and layouts
    assert not {"PACKED", "STEPS", "FLAT", "EVEN"} & set(k.core_config(768, 1, 48, False, 49, 4))
    # a cap belongs to the default tile: overriding the tile without naming a cap drops it
    assert "maxnreg" not in k.core_config(384, 16, 24, True, 196, 2, {"BLOCK_D": 32})
    assert k.core_config(384, 16, 24, True, 196, 2, {"BLOCK_D": 16, "HALVING": 0})["maxnreg"] == 128
    assert k.core_config(384, 16, 24, True, 196, 2, {"BLOCK_D": 32, "maxnreg": 96})["maxnreg"] == 96


@pytest.mark.parametrize(("dtype", "rank", "channels", "config"), [
    (torch.float32, 6, 20, None),  # R padded to 16, C not a multiple of the channel block
    (torch.bfloat16, 24, 40, {"BLOCK_M": 16, "BLOCK_C": 16}),  # several blocks in both directions
    (torch.float32, 33, 16, {"BLOCK_M": 32, "BLOCK_C": 16}),  # R padded to 64
])
def test_delta_gemm_matches_batched_matmul(dtype, rank, channels, config):
    """The Triton Δ GEMM equals xp[..., k, :R] @ dt_weight_k^T per route, in route-major pixel order."""
    from vmamba.ops.triton.ss2d_core import delta_gemm

    g = torch.Generator().manual_seed(21)
    batch, length, routes, state = 2, 23, 4, 1
    xp = torch.randn(batch, length, routes, rank + 2 * state, generator=g).to(dtype)
    weight = torch.randn(routes, channels, rank, generator=g)
    out = delta_gemm(xp.to(DEVICE), weight.to(DEVICE), rank, dtype, config=config)
    expected = torch.einsum("blkr,kcr->kblc", xp.double()[..., :rank], weight.to(dtype).double())
    assert out.dtype == dtype and out.shape == (routes, batch * length, channels)
    err = (out.cpu().double() - expected.reshape(routes, -1, channels)).norm() / expected.norm()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err

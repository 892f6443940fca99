"""Triton selective scan against the float64 reference: forward and every gradient.

Runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is imported) at
small shapes; on a CUDA machine with VMAMBA_TEST_CUDA=1 it runs the compiled kernels instead.
"""

import os
import subprocess
import sys

import pytest
from conftest import triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported
pytest.importorskip("triton")

import torch  # noqa: E402

from vmamba.ops.selective_scan_ref import selective_scan_reference  # noqa: E402
from vmamba.ops.triton.selective_scan import (  # noqa: E402
    LANES_SAVE_INTERVAL,
    default_config,
    selective_scan_bwd,
    selective_scan_fwd,
)
from vmamba.ops.triton.selective_scan_packed import _bc_alignment  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch, groups, per_group, state, length, dtype, seed, noncontig=False, with_d=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    kc = groups * per_group

    def r(*shape):
        return torch.randn(*shape, generator=g)

    u = r(batch, kc, length)
    delta = 0.5 * r(batch, kc, length) - 1.0
    A = -torch.exp(0.5 * r(kc, state))
    B = r(batch, groups, state, length)
    C = r(batch, groups, state, length)
    D = r(kc) if with_d else None
    bias = 0.5 * r(kc) if with_bias else None
    if noncontig:
        # same values, other memory layouts: transposed storage and a strided slice
        u = u.transpose(1, 2).contiguous().transpose(1, 2)
        delta = torch.stack((delta, delta), dim=-1)[..., 0]
        B = B.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        A = A.t().contiguous().t()
    cast = [x.to(dtype) for x in (u, delta, B, C)]
    u, delta, B, C = (x.to(DEVICE) for x in cast)
    A = A.to(DEVICE)
    D = D.to(DEVICE) if D is not None else None
    bias = bias.to(DEVICE) if bias is not None else None
    return u, delta, A, B, C, D, bias


def _check(batch, groups, per_group, state, length, dtype, seed=0, noncontig=False, with_d=True,
           with_bias=True, softplus=True, deterministic=False, config=None):
    ins = _inputs(batch, groups, per_group, state, length, dtype, seed, noncontig, with_d, with_bias)
    leaves = [None if x is None else x.detach().double().cpu().requires_grad_() for x in ins]
    y_ref = selective_scan_reference(*leaves, softplus)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y_ref.backward(gy)

    y = selective_scan_fwd(*ins, softplus, config=config)
    assert y.dtype == torch.float32 and y.shape == ins[0].shape
    assert _rel(y.cpu(), y_ref) < TOL[dtype], "forward"
    # float32 gradients against the reference (the d_state <= 2 default for 2-byte inputs stores du /
    # ddelta in the input dtype; compared below and in test_half_precision_gradients_...)
    full = {**(config or {}), "HALF_GRADS": 0}
    grads = selective_scan_bwd(gy.float().to(DEVICE), *ins, softplus, deterministic=deterministic, config=full)
    if config is None and dtype != torch.float32 and state <= 2:
        default = selective_scan_bwd(gy.float().to(DEVICE), *ins, softplus, deterministic=deterministic)
        for half, exact in zip(default[:2], grads[:2]):
            assert half.dtype == dtype and _rel(half.cpu(), exact.cpu()) < torch.finfo(dtype).eps
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"]
    for name, grad, leaf in zip(names, grads, leaves):
        if leaf is None:
            assert grad is None, name
            continue
        assert grad.shape == leaf.shape, name
        assert torch.isfinite(grad).all(), name
        assert _rel(grad.cpu(), leaf.grad) < TOL[dtype], f"{name}: {_rel(grad.cpu(), leaf.grad):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state", [1, 4, 16])
def test_dtypes_and_states(dtype, state):
    _check(batch=2, groups=2, per_group=3, state=state, length=23, dtype=dtype, seed=state)


@pytest.mark.parametrize("groups", [1, 4])
def test_groups_odd_length_multi_chunk(groups):
    # L spans several chunks (BLOCK_T 16 forward / 8 backward) and ends mid-chunk
    _check(batch=1, groups=groups, per_group=2, state=4, length=37, dtype=torch.float32, seed=10 + groups)


def test_noncontiguous_inputs():
    _check(batch=2, groups=2, per_group=2, state=4, length=19, dtype=torch.float32, seed=3, noncontig=True)


def test_no_d_no_bias_no_softplus():
    _check(batch=1, groups=2, per_group=2, state=2, length=13, dtype=torch.float32, seed=4,
           with_d=False, with_bias=False, softplus=False)


@pytest.mark.parametrize("deterministic", [False, True])
def test_several_channel_blocks_per_group(deterministic, monkeypatch):
    # BLOCK_D smaller than the group: dB / dC reduced over blocks (atomics when the workspace limit is 0)
    import vmamba.ops.triton.selective_scan as mod

    monkeypatch.setattr(mod, "WORKSPACE_LIMIT_BYTES", 0)
    _check(batch=2, groups=2, per_group=5, state=4, length=11, dtype=torch.float32, seed=5,
           deterministic=deterministic, config={"BLOCK_D": 2, "num_warps": 1})


def test_deterministic_is_reproducible():
    ins = _inputs(2, 2, 4, 4, 17, torch.float32, seed=6)
    gy = torch.randn(2, 8, 17).to(DEVICE)
    cfg = {"BLOCK_D": 2, "num_warps": 1}
    g1 = selective_scan_bwd(gy, *ins, True, deterministic=True, config=cfg)
    g2 = selective_scan_bwd(gy, *ins, True, deterministic=True, config=cfg)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_default_config_shapes():
    for cg in (1, 3, 96, 192, 384, 1536):
        for state in (1, 2, 4, 8, 16, 32, 64):
            for backward in (False, True):
                for length in (49, 3136):
                    cfg = default_config(cg, state, backward, length)
                    assert cfg["BLOCK_N"] >= state and cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0
                    assert cfg["BLOCK_D"] >= 1 and cfg["num_warps"] in (1, 2, 4, 8)
                    if cfg.get("LANES"):  # a lane per channel: its states (at most 16) per thread
                        assert 4 <= cfg["BLOCK_N"] <= 16 and cfg["BLOCK_D"] <= 32 * cfg["num_warps"]
                        assert not backward or LANES_SAVE_INTERVAL % cfg["BLOCK_T"] == 0
                    else:
                        assert cfg["BLOCK_D"] * cfg["BLOCK_N"] <= 256
    # cached, but each call returns its own dict: callers (the fused core) update theirs
    first = default_config(96, 1, True, 3136, 2)
    first.update(BLOCK_D=3, FLAT=0)
    again = default_config(96, 1, True, 3136, 2)
    assert (again["BLOCK_D"], again["FLAT"]) == (16, 1) and again is not first


def test_state_64_and_empty():
    _check(batch=1, groups=1, per_group=2, state=64, length=5, dtype=torch.float32, seed=8)
    ins = _inputs(1, 1, 2, 4, 0, torch.float32, seed=9)
    assert selective_scan_fwd(*ins, True).shape == (1, 2, 0)


def test_float64_rejected():
    ins = _inputs(1, 1, 2, 2, 4, torch.float32, seed=0)
    with pytest.raises(TypeError):
        selective_scan_fwd(ins[0].double(), *ins[1:], True)


@pytest.mark.parametrize("config", [{"PREFETCH": 1}, {"PREFETCH": 0, "STAGES": 3}])
def test_prefetch_forward_variant(config):
    # software-pipelined forward (the next chunks loaded during the current chunk's scan, by hand or by
    # Triton's pipeliner)
    _check(batch=1, groups=2, per_group=2, state=2, length=29, dtype=torch.bfloat16, seed=12,
           config={**config, "BLOCK_T": 8})


@pytest.mark.parametrize("state", [1, 4])
def test_flipped_adjoint_scan_variant(state):
    # the backward's adjoint as a forward scan of the time-flipped chunk (config FLIP)
    _check(batch=1, groups=2, per_group=3, state=state, length=21, dtype=torch.float32, seed=13 + state,
           config={"FLIP": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_chunks_drop_the_bounds_masks(dtype):
    # 16 channels per group, 64 positions, d_state 1: the default launches cover whole chunks, intervals
    # and channel blocks, so the kernels run without bounds masks (EVEN); same results as with them
    from vmamba.ops.triton.selective_scan import _even

    elem = torch.finfo(dtype).bits // 8
    for backward in (False, True):
        cfg = {**default_config(16, 1, backward, 64, elem), "EVEN": 1}
        assert _even(cfg, 16, 1, 64, cfg["BLOCK_T"]) and not _even({**cfg, "EVEN": 0}, 16, 1, 64, cfg["BLOCK_T"])
        assert not _even(cfg, 16, 1, 63, cfg["BLOCK_T"]) and not _even(cfg, 15, 1, 64, cfg["BLOCK_T"])
        assert not _even({**cfg, "BLOCK_N": 2}, 16, 1, 64, cfg["BLOCK_T"])
        # the defaults: the backward, and the float32 forward (the 2-byte one spilled without masks)
        assert default_config(16, 1, backward, 64, elem)["EVEN"] == int(backward or elem == 4)
    _check(batch=1, groups=2, per_group=16, state=1, length=64, dtype=dtype, seed=19, config={"EVEN": 1})
    ins = _inputs(1, 2, 16, 1, 64, dtype, seed=19)
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(20)).to(DEVICE)
    # compiled, the two variants may contract or order float operations differently: the float32 results
    # agree to float32 rounding, the 2-byte gradients to one rounding of those
    masked, even = {"EVEN": 0}, {"EVEN": 1}
    y_even = selective_scan_fwd(*ins, True, config=even)
    assert _rel(y_even.cpu(), selective_scan_fwd(*ins, True, config=masked).cpu()) < 1e-6
    for a, b in zip(selective_scan_bwd(gy, *ins, True, deterministic=True, config=even),
                    selective_scan_bwd(gy, *ins, True, deterministic=True, config=masked)):
        assert a.dtype == b.dtype
        assert _rel(a.cpu(), b.cpu()) < (1e-6 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps)


def test_sixteen_channels_per_warp_backward_variant():
    # the stage-1 default of 2-byte inputs: 16 channels per block, 16-step chunks; 20 channels per group
    # (a full and a partial block), 37 positions (a partial last chunk)
    _check(batch=1, groups=2, per_group=20, state=1, length=37, dtype=torch.bfloat16, seed=18,
           config={"BLOCK_D": 16, "BLOCK_T": 16, "FLIP": 1, "num_warps": 1})


def test_sixteen_channels_per_warp_float32_backward_variant():
    # the float32 default from L 512: 16 channels per block in 32-step chunks; 20 channels per group,
    # 75 positions (two whole chunks and a partial one)
    _check(batch=1, groups=2, per_group=20, state=1, length=75, dtype=torch.float32, seed=21,
           config={"BLOCK_D": 16, "BLOCK_T": 32, "FLIP": 1, "num_warps": 1})
    cfg = default_config(96, 1, True, 3136, 4)
    assert (cfg["BLOCK_D"], cfg["BLOCK_T"], cfg["EVEN"]) == (16, 32, 1)


@pytest.mark.parametrize(("dtype", "config"), [
    (torch.bfloat16, {"BLOCK_D": 16, "BLOCK_T": 16, "FLIP": 1}),
    (torch.bfloat16, {"BLOCK_D": 32, "BLOCK_T": 8, "FLIP": 1, "EVEN": 1}),
    (torch.float32, {"BLOCK_D": 8, "BLOCK_T": 8, "FLIP": 0}),
    (torch.float32, {"BLOCK_D": 16, "BLOCK_T": 16, "PREFETCH": 0, "STAGES": 3}),
])
def test_flat_tiles_variant(dtype, config):
    # d_state 1 as (T, D) tiles (config FLAT), forward and backward; 20 channels per group (a full and a
    # partial block of 16), 37 positions (a partial last chunk; EVEN is not taken there)
    _check(batch=1, groups=2, per_group=20, state=1, length=37, dtype=dtype, seed=22,
           config={**config, "FLAT": 1, "num_warps": 1})
    # whole chunks and channel blocks: with EVEN, the same as the 3-D tiles, and with the forward's states
    from vmamba.ops.triton.selective_scan import saved_states_shape

    ins = _inputs(1, 2, 32, 1, 64, dtype, seed=23)
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    flat, tiles3 = {**config, "FLAT": 1, "EVEN": 1}, {**config, "FLAT": 0, "EVEN": 1}
    states = torch.full(saved_states_shape(ins[0], ins[2], ins[3]), float("nan"), device=DEVICE)
    y = selective_scan_fwd(*ins, True, config=flat)
    assert _rel(y.cpu(), selective_scan_fwd(*ins, True, config=tiles3).cpu()) < 1e-6
    for a, b in zip(selective_scan_bwd(gy, *ins, True, deterministic=True, config=flat),
                    selective_scan_bwd(gy, *ins, True, deterministic=True, config=tiles3)):
        assert _rel(a.cpu(), b.cpu()) < 1e-6
    y_saving = selective_scan_fwd(*ins, True, config=flat, states_out=states)
    assert _rel(y_saving.cpu(), y.cpu()) < 1e-6 and torch.isfinite(states).all()


def test_rows_aligned_below_16_elements():
    # L = 52: rows start at multiples of 4 elements, which the kernels are told (ALIGN 4) so that they
    # read and write in vectors; 16 is left to Triton's launcher, odd lengths get nothing
    from vmamba.ops.triton.selective_scan import _row_alignment

    on = {"ROW_ALIGN": 1}
    assert (_row_alignment(on, (196, 196 * 64)), _row_alignment(on, (784, 784 * 96))) == (4, 1)
    assert (_row_alignment(on, (49, 98)), _row_alignment(on, (24, 8)), _row_alignment({}, (24, 8))) == (1, 8, 1)
    for dtype in (torch.float32, torch.bfloat16):
        _check(batch=2, groups=2, per_group=16, state=1, length=52, dtype=dtype, seed=25, config=on)


def test_pipelined_backward_variant():
    # the backward's interval loop through Triton's pipeliner (config STAGES), several intervals
    _check(batch=1, groups=2, per_group=3, state=1, length=37, dtype=torch.bfloat16, seed=17,
           config={"FLIP": 1, "BLOCK_T": 8, "STAGES": 3})


@pytest.mark.parametrize(("state", "block_t", "prefetch"), [(1, 4, 0), (4, 2, 1), (16, 4, 1)])
def test_lanes_forward_variant(state, block_t, prefetch):
    # one channel and all its states per lane (config LANES): tiles (T, N, D), y summed in-thread
    _check(batch=2, groups=2, per_group=5, state=state, length=23, dtype=torch.float32, seed=20 + state,
           config={"LANES": 1, "BLOCK_D": 4, "BLOCK_T": block_t, "num_warps": 1, "PREFETCH": prefetch})


@pytest.mark.parametrize(("state", "block_t", "flip", "block_d", "halving"),
                         [(1, 4, 1, 4, 0), (4, 2, 0, 4, 0), (16, 2, 1, 4, 0), (16, 4, 1, 4, 0), (16, 2, 1, 32, 1),
                          (3, 4, 0, 32, 1), (16, 2, 1, 16, 1), (12, 2, 1, 16, 1)])
def test_lanes_backward_variant(state, block_t, flip, block_d, halving):
    # LANES backward: chunks of block_t positions inside 16-position saved-state intervals, their entry
    # states recomputed into a scratch; 37 positions: partial last chunk and interval. HALVING (one warp
    # of 32 channels): dB / dC summed over the lanes by recursive halving, here with the interpreter's
    # stand-in for the shuffles; d_state 3 leaves a padded state and two lanes per sum; 16 channels at
    # d_state 16 (12: padded states) spread each channel's states over two lanes
    _check(batch=2, groups=2, per_group=5, state=state, length=37, dtype=torch.float32, seed=30 + state,
           config={"LANES": 1, "BLOCK_D": block_d, "BLOCK_T": block_t, "num_warps": 1, "PREFETCH": 1, "FLIP": flip,
                   "HALVING": halving})
    with pytest.raises(ValueError, match="must divide"):
        ins = _inputs(1, 1, 2, state, 9, torch.float32, seed=1)
        selective_scan_bwd(torch.zeros(1, 2, 9, device=DEVICE), *ins, True,
                           config={"LANES": 1, "BLOCK_D": 4, "BLOCK_T": 32, "num_warps": 1})


@pytest.mark.parametrize(("state", "fwd_config"), [(1, None), (1, {"BLOCK_T": 16}), (4, None), (4, {"BLOCK_T": 4}),
                                                   (1, {"BLOCK_T": 32, "PREFETCH": 0, "STAGES": 3}), (16, None)])
def test_states_saved_by_the_forward_replace_the_backward_first_pass(state, fwd_config):
    """The forward's states (option ``states_out``; chunks longer or shorter than the backward's saving
    interval) give the backward the gradients of its own first pass and leave y unchanged."""
    from vmamba.ops.triton.selective_scan import saved_states_shape

    # the last interval is partial (37 positions; 19 at d_state 16, whose LANES intervals are 16 long and
    # whose interpreted kernels are slow)
    ins = _inputs(2, 2, 8, state, 19 if state == 16 else 37, torch.float32, seed=11)
    states = torch.full(saved_states_shape(ins[0], ins[2], ins[3]), float("nan"), device=DEVICE)
    y = selective_scan_fwd(*ins, True, config=fwd_config)
    y_saving = selective_scan_fwd(*ins, True, config=fwd_config, states_out=states)
    assert _rel(y_saving.cpu(), y.cpu()) < 1e-6
    assert torch.isfinite(states).all()  # every kept state was written
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    recomputed = selective_scan_bwd(gy, *ins, True, deterministic=True)
    saved = selective_scan_bwd(gy, *ins, True, deterministic=True, states=states)
    for ours, theirs in zip(saved, recomputed):
        assert _rel(ours.cpu(), theirs.cpu()) < 1e-6
    with pytest.raises(ValueError, match="states must be"):
        selective_scan_bwd(gy, *ins, True, states=states[:1])


def test_saving_forward_takes_sixteen_channels_a_warp_at_d_state_16():
    """A d_state 9-16 forward that keeps the backward's states (the op's training forward) runs LANES tiles
    of 16 channels; without saving from L 512, and at smaller d_state, 32."""
    assert default_config(192, 16, length=3136, elem_size=2, saving=True)["BLOCK_D"] == 16
    assert default_config(192, 16, length=3136, elem_size=2)["BLOCK_D"] == 32
    # below L 512, also without keeping states: 16 channels, capped at 168 registers
    short = default_config(192, 16, length=196, elem_size=2)
    assert (short["BLOCK_D"], short["maxnreg"]) == (16, 168)
    assert "maxnreg" not in default_config(192, 16, length=196, elem_size=2, saving=True)
    assert default_config(192, 4, length=3136, elem_size=2, saving=True)["BLOCK_D"] == 32


@pytest.mark.parametrize("state", [1, 16])
def test_custom_op_keeps_the_states_for_its_backward(state):
    """``vmamba::selective_scan_fwd`` with save_states returns the Triton backward's interval states and
    its autograd backward uses them: the same output and gradients as without saving, and those agree
    with the float64 reference."""
    from vmamba.ops.triton.selective_scan import saved_states_shape

    op = torch.ops.vmamba.selective_scan_fwd
    ins = _inputs(2, 2, 8, state, 19 if state == 16 else 37, torch.bfloat16, seed=13)
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    results = []
    for save in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]
        y, states = op(*leaves, True, "triton", save)
        expected_shape = saved_states_shape(ins[0], ins[2], ins[3]) if save else (0,)
        assert tuple(states.shape) == expected_shape and not states.requires_grad
        y.backward(gy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for saving, recomputing in zip(*results):
        assert _rel(saving.cpu(), recomputing.cpu()) < 1e-6
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in ins]
    y_ref = selective_scan_reference(*leaves, True)
    y_ref.backward(gy.double().cpu())
    for ours, ref in zip(results[0], [y_ref.detach()] + [t.grad for t in leaves]):
        assert _rel(ours.cpu(), ref) < 1e-2  # bf16 inputs: gradients are returned in bf16


@pytest.mark.parametrize(("dtype", "config"), [
    (torch.bfloat16, {"BLOCK_D": 16, "BLOCK_T": 16, "FLIP": 1}),  # the default of long 2-byte sequences
    (torch.float16, {"BLOCK_T": 16, "FLIP": 1, "STAGES": 3}),  # the interval loop through the pipeliner
])
def test_half_precision_gradients_are_the_float32_ones_rounded(dtype, config):
    """HALF_GRADS stores du and ddelta in the inputs' dtype from the kernel: the float32 gradients of the
    same configuration, rounded once; the other gradients are unchanged."""
    ins = _inputs(2, 2, 8, 1, 37, dtype, seed=15)
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    full = selective_scan_bwd(gy, *ins, True, deterministic=True, config=config)
    half = selective_scan_bwd(gy, *ins, True, deterministic=True, config={**config, "HALF_GRADS": 1})
    assert half[0].dtype == dtype and half[1].dtype == dtype
    ulp = torch.finfo(dtype).eps  # relative size of one unit in the last place (at the low end of a binade)
    for i in (0, 1):
        # one rounding of the same float32 value (to nearest on the GPU; the interpreter truncates):
        # each element within one unit in the last place of the float32 gradient
        exact = full[i].cpu().double()
        assert ((half[i].cpu().double() - exact).abs() <= exact.abs() * ulp + 1e-30).all()
    for a, b in zip(half[2:], full[2:]):
        assert a.dtype == torch.float32 and torch.equal(a.cpu(), b.cpu())
    fp32 = _inputs(2, 2, 8, 1, 37, torch.float32, seed=15)
    same = selective_scan_bwd(gy, *fp32, True, deterministic=True, config={**config, "HALF_GRADS": 1})
    assert same[0].dtype == torch.float32  # float32 inputs: float32 gradients


@pytest.mark.parametrize(("dtype", "state", "config"), [
    (torch.float32, 1, {"BLOCK_D": 16, "BLOCK_T": 16, "STAGES": 3}),
    (torch.bfloat16, 1, {"BLOCK_D": 16, "BLOCK_T": 8, "FLAT": 1, "FLIP": 1, "num_warps": 1}),
    (torch.float32, 4, {"BLOCK_D": 16, "BLOCK_T": 8, "LANES": 1, "num_warps": 1}),
])
def test_programs_walking_several_channel_blocks(dtype, state, config):
    """PERSIST: a one-dimensional grid whose programs walk several channel blocks each (10 blocks of 16
    channels over 3 programs: 12 iterations, the last two redo the last block), against the reference
    and, forward with saved states and backward from them, against a program per block."""
    from vmamba.ops.triton.selective_scan import _grid, saved_states_shape

    persist = {**config, "PERSIST": 3}
    assert _grid(persist, 32, 1, 5, torch.device("cpu")) == ((3,), 4)
    assert _grid({**persist, "PREFETCH": 1}, 32, 1, 5, torch.device("cpu")) == ((2, 1, 5), 1)
    _check(batch=5, groups=1, per_group=32, state=state, length=21, dtype=dtype, seed=40 + state, config=persist)
    ins = _inputs(5, 1, 32, state, 21, dtype, seed=41)
    gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(42)).to(DEVICE)
    results = []
    # the forward keeps the states of the default backward's intervals, so the backward runs its defaults
    for fwd_cfg, bwd_cfg in ((persist, {"PERSIST": 3}), (config, None)):
        states = torch.full(saved_states_shape(ins[0], ins[2], ins[3]), float("nan"), device=DEVICE)
        y = selective_scan_fwd(*ins, True, config=fwd_cfg, states_out=states)
        assert torch.isfinite(states).all()
        results.append((y, *selective_scan_bwd(gy, *ins, True, deterministic=True, config=bwd_cfg, states=states)))
    for ours, theirs in zip(*results):
        assert _rel(ours.cpu(), theirs.cpu()) < 1e-6


@pytest.mark.parametrize(("dtype", "length", "config"), [
    (torch.float32, 37, {"BLOCK_T": 64, "STEPS": 4, "BLOCK_D": 2, "ROW_BLOCKS": 3, "num_warps": 1}),
    # rows of up to 32 steps (below the default's range); 8 lanes x 2 steps a channel, 4 channels
    (torch.bfloat16, 21, {"BLOCK_T": 32, "STEPS": 2, "BLOCK_D": 2, "ROW_BLOCKS": 3, "num_warps": 1}),
    (torch.float32, 16, {"BLOCK_T": 16, "STEPS": 2, "BLOCK_D": 4, "ROW_BLOCKS": 2, "num_warps": 1}),
    # 8 lanes of one channel: fewer elements than the warp has threads
    (torch.float16, 40, {"BLOCK_T": 64, "STEPS": 8, "BLOCK_D": 1, "ROW_BLOCKS": 4, "num_warps": 1}),
])
def test_whole_rows_backward_keeps_no_states(dtype, length, config):
    """Where a channel's lanes cover L (STEPS), the backward starts every row from a zero state and keeps
    no states; programs walk several channel blocks (7 channels in blocks walked 2-4 at a time: the last
    program's last blocks are masked), against the reference."""
    from vmamba.ops.triton.selective_scan import saved_states_shape

    ins = _inputs(2, 2, 7, 1, length, dtype, seed=50)
    assert saved_states_shape(ins[0], ins[2], ins[3], config=config)[1] == 0
    chunked = {**config, "BLOCK_T": 8}  # L no longer fits the lanes: the chunked kernel keeps states again
    assert saved_states_shape(ins[0], ins[2], ins[3], config=chunked)[1] == -(-length // 8)
    _check(batch=2, groups=2, per_group=7, state=1, length=length, dtype=dtype, seed=50, config=config)


def test_fast_math_flags():
    """FAST: bit 1 for compiled CUDA (hardware approximations), bit 2 for 2-byte inputs (the short softplus,
    which the interpreter runs too, so the half-precision cases here compare it with the reference)."""
    from vmamba.ops.triton.selective_scan import fast_math

    cuda = 1 if torch.device(DEVICE).type == "cuda" else 0
    assert fast_math(torch.zeros(1, device=DEVICE)) == cuda
    for dtype in (torch.bfloat16, torch.float16):
        assert fast_math(torch.zeros(1, device=DEVICE, dtype=dtype)) == cuda + 2
        assert fast_math(torch.zeros(1, device=DEVICE, dtype=dtype), short_softplus=False) == cuda


@pytest.mark.parametrize("short", [0, 1])
def test_chunked_forward_softplus_forms(short):
    """SHORT_SOFTPLUS: the chunked forward's default keeps the series form (where the short one was
    measured to lose); either form matches the reference with 2-byte inputs."""
    from vmamba.ops.triton.ss2d_core import core_config

    assert default_config(192, 1, False, 3136, 2)["SHORT_SOFTPLUS"] == 0
    assert "SHORT_SOFTPLUS" not in default_config(192, 1, True, 3136, 2)
    assert core_config(192, 1, 6, False, 3136, 2, saving=True)["SHORT_SOFTPLUS"] == 0
    assert "SHORT_SOFTPLUS" not in core_config(192, 1, 6, False, 3136, 2)
    ins = _inputs(1, 2, 5, 1, 70, torch.bfloat16, seed=120)
    assert _forward_against_reference(ins, {"PACKED": 0, "SHORT_SOFTPLUS": short}) < TOL[torch.bfloat16]


def test_default_short_rows_take_whole_rows():
    """Below L 256 at d_state 1 the default backward takes whole rows, so the forward keeps nothing."""
    from vmamba.ops.triton.selective_scan import saved_states_shape

    cfg = default_config(12, 1, backward=True, length=49, elem_size=2)
    assert cfg["ROW_BLOCKS"] >= 1 and cfg["STEPS"] and cfg["BLOCK_T"] >= 49  # selective_scan_rows
    ins = _inputs(1, 2, 12, 1, 49, torch.bfloat16, seed=51)
    assert saved_states_shape(ins[0], ins[2], ins[3])[1] == 0
    empty = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device=DEVICE)
    y = selective_scan_fwd(*ins, True, states_out=empty)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(52)).to(DEVICE)
    with_empty = selective_scan_bwd(gy, *ins, True, deterministic=True, states=empty)
    without = selective_scan_bwd(gy, *ins, True, deterministic=True)
    for a, b in zip(with_empty, without):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="states must be"):
        selective_scan_bwd(gy, *ins, True, states=torch.zeros(1, 4, 24, 1, device=DEVICE))


def test_default_whole_rows_walk_blocks_through_the_pipeliner():
    """The default backward for 64 < L <= 256 (d_state 1): whole rows, one-channel blocks walked 32 at a
    time through Triton's pipeliner; 40 channels leave the second program's last 24 blocks masked."""
    cfg = default_config(40, 1, backward=True, length=100)
    assert (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["ROW_BLOCKS"], cfg["STAGES"]) == (128, 1, 32, 3)
    _check(batch=1, groups=1, per_group=40, state=1, length=100, dtype=torch.float32, seed=70)


@pytest.mark.parametrize("dtype, length, config", [
    # BLOCK_T positions a channel in lanes of STEPS: 16 lanes x 4 steps, 2 channels a warp; 7 channels in
    # blocks walked 3 at a time: the second program's last blocks are masked
    (torch.float32, 49, {"BLOCK_T": 64, "STEPS": 4, "BLOCK_D": 2, "ROW_BLOCKS": 3}),
    (torch.bfloat16, 49, {"BLOCK_T": 64, "STEPS": 4, "BLOCK_D": 2, "ROW_BLOCKS": 3}),
    (torch.float16, 33, {"BLOCK_T": 64, "STEPS": 8, "BLOCK_D": 4, "ROW_BLOCKS": 1}),
    # one channel a warp: 32 lanes x 8 steps (rows of up to 256), lanes past the row's end altogether; 32 x 2
    (torch.float32, 196, {"BLOCK_T": 256, "STEPS": 8, "BLOCK_D": 1, "ROW_BLOCKS": 4}),
    (torch.bfloat16, 60, {"BLOCK_T": 64, "STEPS": 2, "BLOCK_D": 1, "ROW_BLOCKS": 2}),
    # two warps a channel (64 lanes x 4 steps): the scans over the lanes cross warps; rows of 100 aligned to
    # 4 elements, so each lane's steps move as one vector, or (ROW_ALIGN 0) one step at a time
    (torch.float32, 100, {"BLOCK_T": 256, "STEPS": 4, "BLOCK_D": 1, "num_warps": 2, "ROW_BLOCKS": 3}),
    (torch.bfloat16, 100, {"BLOCK_T": 256, "STEPS": 4, "BLOCK_D": 1, "num_warps": 2, "ROW_BLOCKS": 3,
                           "ROW_ALIGN": 0}),
    (torch.float16, 196, {"BLOCK_T": 256, "STEPS": 4, "BLOCK_D": 2, "num_warps": 4, "ROW_BLOCKS": 2}),
    # 64 lanes x 4 steps on one warp: each thread holds two lanes, 32 apart
    (torch.bfloat16, 196, {"BLOCK_T": 256, "STEPS": 4, "BLOCK_D": 1, "num_warps": 1, "ROW_BLOCKS": 3}),
    (torch.float32, 130, {"BLOCK_T": 256, "STEPS": 4, "BLOCK_D": 1, "num_warps": 1, "ROW_BLOCKS": 2,
                          "ROW_ALIGN": 0}),
])
def test_rows_with_consecutive_steps_a_lane(dtype, length, config):
    """STEPS (selective_scan_rows): whole rows with each lane's steps in registers, both scans in two
    levels (within lanes, then over the lanes' totals); against the reference, forward keeping no states."""
    from vmamba.ops.triton.selective_scan import saved_states_shape

    ins = _inputs(2, 2, 7, 1, length, dtype, seed=53)
    assert saved_states_shape(ins[0], ins[2], ins[3], config=config)[1] == 0
    _check(batch=2, groups=2, per_group=7, state=1, length=length, dtype=dtype, seed=53, config=config)


def test_rows_with_consecutive_steps_options_and_strides():
    """STEPS without D, bias or softplus (short rows: the raw deltas here are mostly negative, so the
    decays grow), and from transposed / strided storage."""
    _check(batch=1, groups=2, per_group=4, state=1, length=20, dtype=torch.float32, seed=54, with_d=False,
           with_bias=False, softplus=False, config={"BLOCK_T": 32, "STEPS": 4, "BLOCK_D": 4, "ROW_BLOCKS": 2})
    config = {"BLOCK_T": 64, "STEPS": 4, "BLOCK_D": 2, "ROW_BLOCKS": 2}
    _check(batch=2, groups=1, per_group=6, state=1, length=37, dtype=torch.bfloat16, seed=55, noncontig=True,
           config=config)


def test_rows_with_consecutive_steps_need_rows_that_fit():
    """Rows longer than a channel's lanes hold, or d_state above 1, fall back to the chunked backward."""
    from vmamba.ops.triton.selective_scan_rows import rows_bwd_applies

    assert rows_bwd_applies(1, 64, 16, 4) and not rows_bwd_applies(1, 65, 16, 4)
    assert not rows_bwd_applies(4, 64, 16, 4) and not rows_bwd_applies(1, 8, 8, 3)
    # L 80 does not fit 4 lanes x 4 steps: the chunked kernel takes the same configuration
    _check(batch=1, groups=1, per_group=4, state=1, length=80, dtype=torch.float32, seed=56,
           config={"STEPS": 4, "BLOCK_D": 2, "ROW_BLOCKS": 2, "BLOCK_T": 16})


def _forward_against_reference(ins, config, softplus=True):
    leaves = [None if x is None else x.detach().double().cpu() for x in ins]
    y = selective_scan_fwd(*ins, softplus, config=config)
    assert y.dtype == torch.float32 and y.shape == ins[0].shape
    return _rel(y.cpu(), selective_scan_reference(*leaves, softplus))


@pytest.mark.parametrize(("dtype", "length", "rows", "vector"), [
    (torch.float32, 13, 4, 4),  # 26 channels: blocks of 4 rows straddle the two groups; the last is half empty
    (torch.bfloat16, 9, 8, 8),  # each thread's 8 elements cross into the next row
    (torch.float16, 49, 8, 8),
    (torch.float32, 7, 12, 4),  # 12·7 = 84 elements in a 128-element tile
    (torch.float32, 5, 3, 1),
    (torch.bfloat16, 13, 3, 8),  # blocks of 39 elements: tiles start up to 7 elements before them
    (torch.float32, 49, 5, 4),  # 245: the default's shape of block at L 49, smaller
])
def test_packed_rows_forward(dtype, length, rows, vector):
    """PACKED / VECTOR: runs of whole rows a program, a vector a thread, against the reference; where a
    block does not start on a vector boundary the tile also rescans the tail of the row before it."""
    ins = _inputs(2, 2, 13, 1, length, dtype, seed=80 + length)
    assert _forward_against_reference(ins, {"PACKED": rows, "VECTOR": vector}) < TOL[dtype]


@pytest.mark.parametrize(("dtype", "length", "rows", "vector"), [
    (torch.float32, 12, 5, 8),  # runs of 8 cross rows (and groups of 13 channels) at 4-aligned positions
    (torch.bfloat16, 20, 3, 8),  # blocks also start mid-run
    (torch.float16, 48, 3, 32),  # rows 16-aligned, runs of 32 crossing them
])
def test_packed_rows_forward_aligned_rows(dtype, length, rows, vector):
    """With ALIGN_BC and L and B's and C's rows aligned, B and C are read as aligned pieces of the
    thread's run (an offset back for the elements past a row boundary) instead of element by element."""
    ins = _inputs(2, 2, 13, 1, length, dtype, seed=100 + length)
    assert _bc_alignment(length, ins[3], ins[4]) == (16 if length == 48 else 4)
    config = {"PACKED": rows, "VECTOR": vector, "ALIGN_BC": 1}
    assert _forward_against_reference(ins, config) < TOL[dtype]


def test_packed_rows_forward_strided_inputs_and_no_options():
    """Rows not end to end (transposed storage) are copied first; a batch stride beyond one element's
    rows (a slice of a wider tensor) is read in place; no D, bias or softplus."""
    u, delta, A, B, C, _, _ = _inputs(2, 2, 4, 1, 11, torch.float32, seed=90, noncontig=True)
    assert _forward_against_reference((u, delta, A, B, C, None, None), {"PACKED": 4, "VECTOR": 4}, False) < 1e-5
    wide = torch.randn(2, 16, 11, generator=torch.Generator().manual_seed(91)).to(DEVICE)
    ins = (wide[:, :8], wide[:, 8:] * 0.1, A, B, C, None, None)
    assert ins[0].stride(0) == 16 * 11
    assert _forward_against_reference(ins, {"PACKED": 4, "VECTOR": 4}) < 1e-5


# Runs in a child process under the interpreter: B and C end where an unreadable page begins, so a read past
# them (by the last program's tail slots, whose rows lie past the last channel) kills the child.
_GUARDED_PACKED_FORWARD = """
import ctypes, mmap, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from vmamba.ops.selective_scan_ref import selective_scan_reference
from vmamba.ops.triton.selective_scan import selective_scan_fwd

def guarded(shape):
    nbytes, page = torch.Size(shape).numel() * 4, mmap.PAGESIZE
    pages = -(-nbytes // page) + 1
    buf = mmap.mmap(-1, pages * page)
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + (pages - 1) * page, page, 0) == 0
    return torch.frombuffer(buf, dtype=torch.float32, count=nbytes // 4, offset=(pages - 1) * page - nbytes).view(shape)

g = torch.Generator().manual_seed(0)
u, delta = torch.randn(2, 14, 10, generator=g), 0.5 * torch.randn(2, 14, 10, generator=g) - 1
A = -torch.exp(0.5 * torch.randn(14, 1, generator=g))
B, C = guarded((2, 2, 1, 10)), guarded((2, 2, 1, 10))
B.copy_(torch.randn(2, 2, 1, 10, generator=g))
C.copy_(torch.randn(2, 2, 1, 10, generator=g))
D, bias = torch.randn(14, generator=g), torch.randn(14, generator=g)
config = {"PACKED": 3, "VECTOR": 4, "ALIGN_BC": int(sys.argv[1])}  # 14 rows: the last program holds 2 of 3;
# rows of 10 elements: a thread's 4 can reach into the next row
y = selective_scan_fwd(u, delta, A, B, C, D, bias, True, config=config)
ref = selective_scan_reference(*(x.double() for x in (u, delta, A, B, C, D, bias)), True)
print("max error", (y - ref).abs().max().item())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages through libc's mprotect")
@pytest.mark.parametrize("align_bc", [0, 1])
def test_packed_forward_reads_b_and_c_within_their_tensors(align_bc):
    """The packed forward loads B and C unmasked; the rows it addresses past the last channel are clamped
    to the last group. Checked with B and C ending at an unreadable page (a child process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _GUARDED_PACKED_FORWARD, str(align_bc)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-5


def test_default_forward_packs_short_rows():
    """At d_state 1 the default forward packs rows of up to 256 steps: at L 49 10 rows a program in both
    dtypes (tiles of 512 elements, not starting on vector boundaries), at L 196 10 bf16 or 5 float32 rows
    (256 threads); with and without kept states (none: the backward takes whole rows) it matches the
    reference."""
    def packed(cg, length, elem_size):
        cfg = default_config(cg, 1, False, length, elem_size)
        return cfg.get("PACKED"), cfg.get("VECTOR")

    # B and C in aligned pieces (where L and their rows allow it) in both dtypes
    assert default_config(384, 1, False, 196, 4)["ALIGN_BC"] == 1
    assert default_config(384, 1, False, 196, 2)["ALIGN_BC"] == 1
    assert packed(768, 49, 2) == (10, 8) and packed(768, 49, 4) == (10, 4)
    assert packed(384, 196, 2) == (10, 8) and packed(384, 196, 4) == (5, 4)
    assert packed(192, 784, 2) == (None, None)
    ins = _inputs(1, 2, 24, 1, 49, torch.bfloat16, seed=92)
    assert _forward_against_reference(ins, None) < TOL[torch.bfloat16]
    from vmamba.ops.triton.selective_scan import saved_states_shape

    empty = torch.empty(saved_states_shape(ins[0], ins[2], ins[3]), device=DEVICE)
    assert empty.shape[1] == 0
    assert torch.equal(selective_scan_fwd(*ins, True, states_out=empty), selective_scan_fwd(*ins, True))


def test_halving_applies_to_one_warp_of_channel_lanes():
    """HALVING takes the channel lanes of one warp (32 channels and 2 N <= 32, or 16 channels and N = 16);
    the shuffles only compiled."""
    from vmamba.ops.triton.selective_scan import halving

    u = torch.zeros(1, device=DEVICE)
    lanes = {"LANES": 1, "BLOCK_D": 32, "BLOCK_N": 16, "num_warps": 1, "HALVING": 1}
    assert halving(lanes, u) == (2 if DEVICE == "cuda" else 1)
    assert halving({**lanes, "BLOCK_D": 16}, u) == halving(lanes, u)
    assert default_config(32, 16, backward=True, length=3136)["HALVING"] == 1
    # 16 channel lanes in 4-position chunks by default at d_state 9-16 (measured at L 3136, 784, 196 and 49)
    assert [tuple(default_config(192, n, backward=True, length=length)[key] for key in ("BLOCK_D", "BLOCK_T"))
            for n, length in ((16, 3136), (12, 512), (16, 49), (8, 3136), (8, 196))] == [
        (16, 4), (16, 4), (16, 4), (32, 4), (32, 2)]
    for off in ({"HALVING": 0}, {"LANES": 0}, {"BLOCK_D": 8}, {"BLOCK_D": 16, "BLOCK_N": 8}, {"num_warps": 2},
                {"BLOCK_N": 32}):
        assert halving({**lanes, **off}, u) == 0, off

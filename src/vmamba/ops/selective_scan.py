"""Selective scan interface: input checks, backend dispatch and the ``vmamba::selective_scan`` custom op.

Layout (same as the published implementation): u, delta (batch, K*C, L); A (K*C, N); B, C
(batch, K, N, L), shared by the C channels of each of the K groups; D, delta_bias (K*C).

The forward and the backward are two opaque ``torch.library`` custom ops with fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces models without graph breaks and
``FlopCounterMode`` sees a single op per scan. Plain eager calls run the same functions as an
``autograd.Function`` instead, without the custom-op dispatch (:mod:`vmamba.ops._eager`).
"""

import contextlib
import enum
import importlib.util
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._eager import compiling, eager_function, intercepted
from .selective_scan_ref import selective_scan_reference
from .selective_scan_torch import selective_scan_torch_bwd, selective_scan_torch_fwd


class ScanBackend(str, enum.Enum):
    """Implementations of the selective scan."""

    REFERENCE = "reference"  # sequential loop, the oracle (float64 capable)
    TORCH = "torch"  # chunked parallel scan from tensor ops, any device
    TRITON = "triton"  # fused GPU kernels (CUDA tensors only)


_default_backend: ScanBackend | None = None
# The d_states at which the Triton forward keeps the backward's states (see saves_states): where measured
SAVE_STATES_AT = frozenset({1, 2, 16})


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out installation counts as absent
        return False


# Looked up once at import: torch.compile then traces backend resolution as a constant.
_TRITON_FOUND = _find_triton()


def triton_available() -> bool:
    """True when the Triton package can be imported (it is never imported just to check)."""
    return _TRITON_FOUND


def set_default_backend(backend: "ScanBackend | str | None") -> None:
    """Force a backend for every scan that does not name one; None restores automatic choice."""
    global _default_backend
    _default_backend = None if backend is None else ScanBackend(backend)


@contextlib.contextmanager
def use_backend(backend: "ScanBackend | str | None") -> Iterator[None]:
    """Context manager form of :func:`set_default_backend`."""
    previous = _default_backend
    set_default_backend(backend)
    try:
        yield
    finally:
        set_default_backend(previous)


def resolve_backend(backend: "ScanBackend | str | None", device: torch.device) -> ScanBackend:
    """The backend a call will use: explicit, else the default, else Triton for CUDA when present."""
    if backend is None:
        backend = _default_backend
    if backend is None:
        if device.type == "cuda" and triton_available():
            return ScanBackend.TRITON
        return ScanBackend.TORCH
    try:
        backend = ScanBackend(backend)
    except ValueError:
        names = ", ".join(b.value for b in ScanBackend)
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of: {names}") from None
    if backend is ScanBackend.TRITON and device.type != "cuda":
        raise ValueError(f"the triton selective-scan backend needs CUDA tensors, got device {device}")
    return backend


def _triton_impl(name: str) -> Callable:
    from .triton import selective_scan as triton_scan  # imported lazily: Triton is optional

    return getattr(triton_scan, name)


def _forward_impl(backend: ScanBackend) -> Callable:
    if backend is ScanBackend.TRITON:
        return _triton_impl("selective_scan_fwd")
    return selective_scan_torch_fwd


def _backward_impl(backend: ScanBackend) -> Callable:
    if backend is ScanBackend.TRITON:
        return _triton_impl("selective_scan_bwd")
    return selective_scan_torch_bwd


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _saved_states_shape(u: Tensor, A: Tensor, B: Tensor, backend: str, save_states: bool) -> tuple[int, ...]:
    """Shape of the states the forward keeps for the backward: Triton's interval states, else none."""
    if save_states and ScanBackend(backend) is ScanBackend.TRITON:
        return _triton_impl("saved_states_shape")(u, A, B)
    return (0,)


def _scan_fwd_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   delta_bias: Tensor | None, delta_softplus: bool, backend: str,
                   save_states: bool = False) -> tuple[Tensor, Tensor]:
    impl = _forward_impl(ScanBackend(backend))
    states = u.new_empty(_saved_states_shape(u, A, B, backend, save_states), dtype=torch.float32)
    # with states the backward skips its first pass, which recomputes them
    saving = {"states_out": states} if states.numel() else {}
    return impl(u, delta, A, B, C, D, delta_bias, delta_softplus, **saving).contiguous(), states


_scan_fwd_op = torch.library.custom_op("vmamba::selective_scan_fwd", _scan_fwd_impl, mutates_args=())


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, backend, save_states=False):
    shape = _saved_states_shape(u, A, B, backend, save_states)
    return u.new_empty(u.shape, dtype=_out_dtype(u, delta, A, B, C)), u.new_empty(shape, dtype=torch.float32)


def _scan_bwd_impl(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                   backend: str, states: Tensor | None = None) -> list[Tensor]:
    impl = _backward_impl(ScanBackend(backend))
    saved = {"states": states} if states is not None and states.numel() else {}
    grads = impl(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, **saved)
    inputs = (u, delta, A, B, C, D, delta_bias)
    # Absent D / delta_bias get an empty placeholder: custom ops cannot return None.
    return [g.to(x.dtype).contiguous() if x is not None else u.new_empty(0) for g, x in zip(grads, inputs)]


_scan_bwd_op = torch.library.custom_op("vmamba::selective_scan_bwd", _scan_bwd_impl, mutates_args=())


@_scan_bwd_op.register_fake
def _(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus, backend, states=None):
    inputs = (u, delta, A, B, C, D, delta_bias)
    return [torch.empty_like(x) if x is not None else u.new_empty(0) for x in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, backend, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend


def _backward_with(scan_bwd: Callable) -> Callable:
    def backward(ctx, grad_out, _grad_states):
        if grad_out is None:  # eager twin, no gradient reached the output: every input's is zero
            return (None,) * 10
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = scan_bwd(grad_out, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, ctx.backend, states)
        d_u, d_delta, d_A, d_B, d_C, d_D, d_bias = grads
        return (d_u, d_delta, d_A, d_B, d_C, d_D if D is not None else None,
                d_bias if delta_bias is not None else None, None, None, None)

    return backward


_scan_fwd_op.register_autograd(_backward_with(_scan_bwd_op), setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (vmamba.ops._eager); torch.compile traces the custom ops.
_ScanEager = eager_function(_scan_fwd_impl, _setup_context, _backward_with(_scan_bwd_impl))


def _check_shapes(u, delta, A, B, C, D, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, K*C, L), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be ({channels}, N), got {tuple(A.shape)}")
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != state or t.shape[3] != length:
            raise ValueError(f"selective_scan: {name} must be ({batch}, K, {state}, {length}), "
                             f"got {tuple(t.shape)}")
        if channels % t.shape[1]:
            raise ValueError(f"selective_scan: {channels} channels do not split into {t.shape[1]} groups")
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B has {B.shape[1]} groups but C has {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"selective_scan: {name} must be ({channels},), got {tuple(t.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = True,
                   backend: "ScanBackend | str | None" = None) -> Tensor:
    """Mamba S6 selective scan, differentiable in every input.

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t h_t + D u_t,  Δ = softplus(delta + delta_bias).
    Inputs may be float32, float16 or bfloat16 (float64 too); the state and the output are float32
    (float64 for float64 inputs). ``backend`` picks the implementation; None chooses automatically.
    """
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    chosen = resolve_backend(backend, u.device)
    if chosen is ScanBackend.REFERENCE:
        # The oracle stays plain autograd code, outside the custom op.
        return selective_scan_reference(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
    save_states = saves_states(chosen, u, delta, A, B, C, D, delta_bias)
    op = _scan_fwd_op if compiling() or intercepted() else _ScanEager.call
    return op(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), chosen.value, save_states)[0]


def saves_states(backend: ScanBackend, *inputs: Tensor | None) -> bool:
    """Whether the forward keeps the states its backward would otherwise recompute in a first pass:
    Triton, a backward to follow, and d_state in SAVE_STATES_AT (inputs in selective_scan's order).
    H200, forward + backward: d_state 1, stage 1, 13 % faster; d_state 16 (vanilla VMamba-T shapes, batch
    128, session 19) 10-12 % faster in bf16 at every stage and 11-17 % in float32 (stages 1, 3), the
    states taking as much memory as u in float32. Only where measured: at d_state 64 they would take
    4x u."""
    state = inputs[2].shape[1]
    return (backend is ScanBackend.TRITON and state in SAVE_STATES_AT and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in inputs))


def _scan_flops(batch: int, channels: int, length: int, state: int, with_d: bool) -> int:
    """The published convention: 9·B·L·D·N for the scan plus B·D·L for the skip term."""
    return 9 * batch * length * channels * state + (batch * channels * length if with_d else 0)


def _register_flop_formulas() -> None:
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover - very old torch
        return

    @register_flop_formula(torch.ops.vmamba.selective_scan_fwd)
    def _fwd_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args, **kwargs) -> int:
        batch, channels, length = u_shape
        return _scan_flops(batch, channels, length, A_shape[1], D_shape is not None)

    @register_flop_formula(torch.ops.vmamba.selective_scan_bwd)
    def _bwd_flops(grad_shape, u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, *args,
                   **kwargs) -> int:
        batch, channels, length = u_shape
        return 2 * _scan_flops(batch, channels, length, A_shape[1], D_shape is not None)


_register_flop_formulas()

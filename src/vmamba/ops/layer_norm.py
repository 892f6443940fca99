"""LayerNorm over the last dimension: Triton kernels for CUDA rows, ``F.layer_norm`` everywhere else.

On CUDA tensors whose rows are contiguous (last-dim stride 1, leading dims mergeable into one row
dimension without a copy; this includes the NHWC view of a channels-last NCHW map) the norm runs
through the ``vmamba::layer_norm_fwd`` / ``vmamba::layer_norm_bwd`` custom ops: Triton kernels that
process many rows per program, with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces them as single ops (eager calls skip the custom-op dispatch:
:mod:`vmamba.ops._eager`). Under torch.compile, :data:`COMPILED_NORM` decides between those ops and
``F.layer_norm``, which Inductor generates and fuses with its neighbours. Any other input (CPU,
float64, strided rows, no Triton) takes ``F.layer_norm``, bit-identical to ``nn.LayerNorm``.

:func:`layer_norm_sum` normalises the sum of K stacked inputs, summed in float32 inside the kernel.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._eager import compiling, eager_function
from ._toggle import Toggle
from .selective_scan import triton_available

# Read once: a module constant is free for torch.compile to trace (importlib lookups are not).
_TRITON = triton_available()
# Tests set this to run the Triton ops on CPU tensors under TRITON_INTERPRET=1.
_FORCE_TRITON = False
_TRITON_LAYER_NORM = Toggle()


class CompiledNorm(str, enum.Enum):
    """Which LayerNorm code a ``torch.compile``d model runs (:data:`COMPILED_NORM`)."""

    AUTO = "auto"  # Inductor's where no gradient is needed (inference), the Triton custom ops otherwise
    TRITON = "triton"  # always the Triton custom ops (opaque to Inductor)
    INDUCTOR = "inductor"  # always F.layer_norm, which Inductor generates and fuses with its neighbours


# H200, VMamba-T, batch 128, bf16 (BENCHMARKS.md, sessions 24-25). Training with CUDA graphs
# (mode="reduce-overhead"): 39.6 ms a step with our ops, 49.7 with Inductor's, whose LayerNorm backward
# kernels are slower. Inference, default mode: with our ops the compiled forward is bound by the host
# (0.77x eager; each custom-op call costs far more host time than a generated kernel), with Inductor's
# 1.36x eager, for 3 % more GPU time. Hence AUTO. Set it before compiling.
COMPILED_NORM = CompiledNorm.AUTO
# Wider rows would not fit a single register tile.
MAX_TRITON_CHANNELS = 16384
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["COMPILED_NORM", "CompiledNorm", "layer_norm", "layer_norm_sum", "use_triton_layer_norm"]


def use_triton_layer_norm(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Allow (default) or forbid the Triton kernels inside a block; forbidden, every call is
    ``F.layer_norm`` (e.g. for FLOP counting, which sees aten's layer norm but not custom ops)."""
    return _TRITON_LAYER_NORM.scoped(enabled)


def _kernels():
    from .triton import layer_norm as kernels  # imported lazily: Triton is optional

    return kernels


def _fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype,
              return_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, xsum) of the LayerNorm of x (K, M, C) summed over K; xsum is empty unless
    ``return_sum`` and K > 1 (custom ops cannot return None, nor a view of an input)."""
    store_sum = return_sum and x.shape[0] > 1
    out, mean, rstd, xsum = _kernels().layer_norm_fwd(x, weight, bias, eps, out_dtype, store_sum)
    return out, mean, rstd, xsum if store_sum else x.new_empty(0)


_fwd_op = torch.library.custom_op("vmamba::layer_norm_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype, return_sum):
    k, m, c = x.shape
    stats = x.new_empty((m,), dtype=torch.float32)
    xsum = x.new_empty((m, c)) if return_sum and k > 1 else x.new_empty(0)
    return x.new_empty((m, c), dtype=out_dtype), stats, torch.empty_like(stats), xsum


def _bwd_impl(dout: Tensor, xhat_src: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
              has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in xhat_src.dtype, dweight, dbias float32); absent parameters get an empty tensor."""
    dx, dweight, dbias = _kernels().layer_norm_bwd(dout, xhat_src, weight, mean, rstd, has_bias)
    # (a fresh empty tensor per absent one: a custom op may not return one tensor twice)
    return (dx, dweight if dweight is not None else mean.new_empty(0),
            dbias if dbias is not None else mean.new_empty(0))


_bwd_op = torch.library.custom_op("vmamba::layer_norm_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _(dout, xhat_src, weight, mean, rstd, has_bias):
    c = xhat_src.shape[-1]
    dweight = mean.new_empty((c,) if weight is not None else (0,))
    dbias = mean.new_empty((c,) if has_bias else (0,))
    return torch.empty_like(xhat_src, memory_format=torch.contiguous_format), dweight, dbias


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps, _out_dtype, _return_sum = inputs
    _out, mean, rstd, xsum = output
    # For K > 1 only the sum is kept, so the caller's K inputs can be freed.
    ctx.save_for_backward(x[0] if x.shape[0] == 1 else xsum, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd, xsum)
    ctx.k = x.shape[0]
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_with(bwd):
    def backward(ctx, dout, _dmean, _drstd, _dxsum):
        src, weight, mean, rstd = ctx.saved_tensors
        if src.dim() != 2:
            raise RuntimeError("vmamba::layer_norm_fwd: K > 1 needs return_sum=True for the backward")
        dx, dweight, dbias = bwd(dout, src, weight, mean, rstd, ctx.has_bias)
        # Every summed input gets the same gradient: an expand, not K copies.
        dxs = dx.unsqueeze(0) if ctx.k == 1 else dx.unsqueeze(0).expand(ctx.k, *dx.shape)
        dweight = dweight.to(weight.dtype) if weight is not None else None
        dbias = dbias.to(ctx.bias_dtype) if ctx.has_bias else None
        return dxs, dweight, dbias, None, None, None

    return backward


_fwd_op.register_autograd(_backward_with(_bwd_op), setup_context=_setup_context)
_NormEager = eager_function(_fwd_impl, _setup_context, _backward_with(_bwd_impl))


def _mergeable(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when dims of these sizes and strides merge into one strided dimension without a copy."""
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def _triton_when_compiling(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """The policy of :data:`COMPILED_NORM` (a member or its string value) for these inputs."""
    if COMPILED_NORM == CompiledNorm.AUTO:
        return _needs_grad(x, weight, bias)
    return COMPILED_NORM == CompiledNorm.TRITON


def _use_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, leading: int) -> bool:
    """Whether the kernels apply to x, whose dims from ``leading`` to -2 are the rows."""
    if not _TRITON_LAYER_NORM.enabled or not (_FORCE_TRITON or (_TRITON and x.is_cuda)):
        return False
    if compiling() and not _triton_when_compiling(x, weight, bias):
        return False
    c = x.shape[-1]
    if x.dim() <= leading or x.numel() == 0 or not 0 < c <= MAX_TRITON_CHANNELS or x.stride(-1) != 1:
        return False
    if x.dtype not in _KERNEL_DTYPES:
        return False
    if any(t is not None and (t.dtype not in _KERNEL_DTYPES or t.shape != (c,)) for t in (weight, bias)):
        return False
    return _mergeable(x.shape[leading:-1], x.stride()[leading:-1])


def _output_dtype(x: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    # Under autocast the next layer is a matmul in the autocast dtype: writing that dtype here saves
    # its cast and halves this write.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _needs_grad(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))


def _needs_sum(xs: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return xs.shape[0] > 1 and _needs_grad(xs, weight, bias)


def _triton_norm(xs: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                 out_dtype: torch.dtype | None) -> Tensor:
    """The kernels on xs (K, *rows, C), through the custom op when compiling and its eager twin
    otherwise; the output has shape (*rows, C)."""
    k, c = xs.shape[0], xs.shape[-1]
    rows = xs.view(k, -1, c)
    op = _fwd_op if compiling() else _NormEager.call
    out = op(rows, weight, bias, float(eps), _output_dtype(xs, out_dtype), _needs_sum(xs, weight, bias))[0]
    return out.view(xs.shape[1:])


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm of x over its last dimension (any leading shape), differentiable in x, weight, bias.

    The output dtype is ``out_dtype`` if given; on the Triton path it is otherwise the autocast dtype
    when autocast is on for x's device, else x.dtype (the ``F.layer_norm`` fallback keeps its own
    dtype rules). Gradients come back in the dtypes of the inputs and parameters.
    """
    if _use_triton(x, weight, bias, 0):
        return _triton_norm(x.unsqueeze(0), weight, bias, eps, out_dtype)
    out = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return out if out_dtype is None else out.to(out_dtype)


class _RouteSum(torch.autograd.Function):
    """xs (K, ...) summed over K, in float32 for 2-byte inputs. Its gradient is one tensor in xs.dtype
    viewed K times (stride 0), as the Triton path's is: autograd's own (sum in float32, then the cast)
    would cast the expanded gradient, which writes all K copies out."""

    @staticmethod
    def forward(ctx, xs: Tensor) -> Tensor:
        ctx.input_dtype, ctx.routes = xs.dtype, xs.shape[0]
        return xs.sum(0, dtype=torch.float32) if xs.dtype in (torch.float16, torch.bfloat16) else xs.sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to(ctx.input_dtype).unsqueeze(0).expand(ctx.routes, *grad.shape)


def layer_norm_sum(xs: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm over the last dimension of the sum of K stacked inputs xs (K, ..., C).

    The sum is taken in float32 (the K inputs are read once, inside the kernel on the Triton path).
    The output has shape xs.shape[1:] and dtype ``out_dtype``, else (Triton path under autocast) the
    autocast dtype, else xs.dtype. Each of the K inputs receives the same gradient.
    """
    if xs.dim() < 2:
        raise ValueError(f"layer_norm_sum: xs must be (K, ..., C), got shape {tuple(xs.shape)}")
    if _use_triton(xs, weight, bias, 1):
        return _triton_norm(xs, weight, bias, eps, out_dtype)
    summed = _RouteSum.apply(xs)
    weight = weight.to(summed.dtype) if weight is not None else None
    bias = bias.to(summed.dtype) if bias is not None else None
    out = F.layer_norm(summed, (xs.shape[-1],), weight, bias, eps)
    return out.to(out_dtype or xs.dtype)

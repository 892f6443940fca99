"""Eager twins of the custom ops: the same forward, context and backward as a ``torch.autograd.Function``.

``torch.library`` custom ops are what ``torch.compile`` needs (one opaque node with a fake
implementation), but every eager call pays their dispatch: on the H200 machine the custom-op wrapper
took more host time per training step than the GPU took for the step's work (BENCHMARKS.md).
Outside compilation the ops therefore run through an ``autograd.Function`` built from the very same
functions; under ``torch.compile`` / ``torch.export`` the custom op is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compiling() -> bool:
    """True while torch.compile or torch.export is tracing (the custom ops must be used then)."""
    return torch.compiler.is_compiling()


def intercepted() -> bool:
    """True while a Python dispatch mode (``FlopCounterMode``, op counters) sees every op: it should then
    see the custom op, whose FLOP formula is registered, rather than the implementation's own ops."""
    return torch._C._len_torch_dispatch_stack() > 0


def eager_function(forward: Callable, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function running ``forward(*inputs)``, then ``setup_context(ctx, inputs, output)``,
    with ``backward(ctx, *grads)``: the signatures of ``torch.library`` custom-op registration."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)  # outputs without a gradient get None, not zeros
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        @staticmethod
        def call(*inputs):
            """``apply``, or (no input needs a gradient) the bare forward: in inference the
            autograd.Function machinery costs host time (about 20 µs a call on the H200 machine) for
            nothing."""
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
                return EagerOp.apply(*inputs)
            return forward(*inputs)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{forward.__name__}"
    return EagerOp

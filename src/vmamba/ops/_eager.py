"""Eager twins of the custom ops: the same forward, context and backward as a ``torch.autograd.Function``.

``torch.library`` custom ops are what ``torch.compile`` needs (one opaque node with a fake
implementation), but every eager call pays their dispatch: on the H200 machine the custom-op wrapper
took more host time per training step than the GPU took for the step's work (BENCHMARKS.md).
Outside compilation the ops therefore run through an ``autograd.Function`` built from the very same
functions; under ``torch.compile`` / ``torch.export`` the custom op is used.

With ``VMAMBA_TRITON_OP=1`` (read at import), where torch has ``torch.library.triton_op`` (2.6+) and
the kernels are compiled (not the CPU interpreter, whose kernels Dynamo cannot trace), the ops are
registered with ``triton_op`` instead: torch.compile then traces into their Python bodies and Inductor
launches the kernels itself (:mod:`.triton._launch`), without a call back into Python per op. It is
off by default until it is timed on a GPU (BENCHMARKS.md, session 6: the custom-op dispatch bounds a
compiled VMamba step).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def inductor_launches_kernels() -> bool:
    """Whether the Triton ops are ``triton_op``s that Inductor traces into (see the module docstring)."""
    off = ("", "0")
    return (os.environ.get("VMAMBA_TRITON_OP", "0") not in off and hasattr(torch.library, "triton_op")
            and os.environ.get("TRITON_INTERPRET", "0") in off)


def kernel_op(name: str, impl: Callable, fake: Callable):
    """Register ``impl`` as the op ``name``: a ``triton_op`` (traced by torch.compile, which derives its
    fake implementation) or an opaque ``custom_op`` with the fake implementation ``fake``."""
    if inductor_launches_kernels():
        return torch.library.triton_op(name, impl, mutates_args=())
    op = torch.library.custom_op(name, impl, mutates_args=())
    op.register_fake(fake)
    return op


def compiling() -> bool:
    """True while torch.compile or torch.export is tracing (the custom ops must be used then)."""
    return torch.compiler.is_compiling()


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

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{forward.__name__}"
    return EagerOp

"""How the ops launch their kernels: directly, or as ``wrap_triton`` nodes while torch.compile traces them.

Registered with ``torch.library.triton_op`` (:func:`vmamba.ops._eager.kernel_op`), an op's Python body
is traced with fake tensors when torch.compile lowers it; its kernels must then be called through
``torch.library.wrap_triton`` so that Inductor records them and launches them itself, with its own
launcher, instead of calling back into Python for every op.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .._eager import inductor_launches_kernels

# Only triton_op bodies are ever traced; the opaque ops skip the check (host time on every launch).
_TRACEABLE = inductor_launches_kernels()


def _traced(like: torch.Tensor) -> bool:
    return _TRACEABLE and is_fake(like)


def launcher(kernel, like: torch.Tensor):
    """``kernel``, or its ``wrap_triton`` form when ``like`` is a fake tensor (the op is being traced)."""
    if _traced(like):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def launch_options(cfg: dict, like: torch.Tensor) -> dict:
    """num_warps, and maxnreg (a register cap per thread) on direct launches only: traced launches
    pass num_warps / num_stages to Inductor, which does not take a register cap."""
    options = {"num_warps": cfg["num_warps"]}
    if cfg.get("maxnreg") and not _traced(like):
        options["maxnreg"] = cfg["maxnreg"]
    return options

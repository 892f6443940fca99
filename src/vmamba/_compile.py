"""``torch.compile`` with the modes that ``vmamba bench`` and ``vmamba train`` accept."""

from __future__ import annotations

import torch
from torch import nn

# "reduce-overhead" replays CUDA graphs: no per-kernel launch cost on the host
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    """Raise a ValueError naming the choices unless ``mode`` is one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)`` in one of :data:`COMPILE_MODES` ("default": PyTorch's default mode)."""
    check_compile_mode(mode)
    return torch.compile(model, backend=backend, mode=None if mode == "default" else mode)

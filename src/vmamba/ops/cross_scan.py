"""2D routes for the selective scan: unfold a feature map into K sequences and fold them back.

``cross_scan`` maps a (B, C, H, W) map (or (B, H, W, C) with ``channel_last=True``) to K sequences
(B, K, C, L), L = H*W. ``cross_merge`` is its exact adjoint: it maps each sequence back to its pixel
positions and sums the K contributions, giving (B, C, H, W) or (B, H, W, C).

Routes per mode (k index order matters: it matches the published weight layout):

* ``cross2d``: k0 row-major, k1 column-major, k2 = k0 reversed, k3 = k1 reversed.
* ``bidi``: k0 row-major, k1 row-major reversed.
* ``unidi``: k0 row-major.
* ``cascade2d`` is not a set of routes; see :mod:`vmamba.layers.ss2d`.

CUDA tensors go to the Triton kernels of :mod:`vmamba.ops.triton.cross_scan` when the selective scan
would use its Triton backend (Triton installed, no other backend forced); everything else uses the
tensor-op composition below, which autograd differentiates.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor


class ScanMode(str, enum.Enum):
    """How a 2D map is turned into sequences for the selective scan."""

    CROSS2D = "cross2d"
    UNIDI = "unidi"
    BIDI = "bidi"
    CASCADE2D = "cascade2d"

    @property
    def num_routes(self) -> int:
        """K: the number of sequences (and of per-route parameter sets)."""
        return {ScanMode.CROSS2D: 4, ScanMode.UNIDI: 1, ScanMode.BIDI: 2, ScanMode.CASCADE2D: 4}[self]


def _as_channel_first(x: Tensor, channel_last: bool) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects a 4-D feature map, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) if channel_last else x


def _use_triton(x: Tensor) -> bool:
    from .selective_scan import ScanBackend, resolve_backend

    return x.is_cuda and resolve_backend(None, x.device) is ScanBackend.TRITON


def cross_scan(x: Tensor, mode: ScanMode | str = ScanMode.CROSS2D, channel_last: bool = False) -> Tensor:
    """Unfold a feature map into the K route sequences of ``mode``: returns (B, K, C, H*W)."""
    mode = ScanMode(mode)
    if mode is ScanMode.CASCADE2D:
        raise ValueError("cascade2d scans rows then columns inside SS2D; it has no cross_scan routes")
    if _use_triton(x):
        from .triton.cross_scan import cross_scan_triton

        return cross_scan_triton(x, mode.value, channel_last)
    x = _as_channel_first(x, channel_last)
    rows = x.flatten(2)
    if mode is ScanMode.UNIDI:
        return rows[:, None]
    if mode is ScanMode.BIDI:
        return torch.stack((rows, rows.flip(-1)), dim=1)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack((rows, cols, rows.flip(-1), cols.flip(-1)), dim=1)


def cross_merge(y: Tensor, height: int, width: int, mode: ScanMode | str = ScanMode.CROSS2D,
                channel_last: bool = False) -> Tensor:
    """Adjoint of :func:`cross_scan`: (B, K, C, H*W) → summed map (B, C, H, W) or (B, H, W, C)."""
    mode = ScanMode(mode)
    if y.dim() != 4 or y.shape[1] != mode.num_routes or y.shape[3] != height * width:
        raise ValueError(f"cross_merge({mode.value}) expects (B, {mode.num_routes}, C, {height * width}), "
                         f"got {tuple(y.shape)}")
    if mode is not ScanMode.CASCADE2D and _use_triton(y):
        from .triton.cross_scan import cross_merge_triton

        return cross_merge_triton(y, height, width, mode.value, channel_last)
    batch, _, channels, _ = y.shape
    if mode is ScanMode.UNIDI:
        rows = y[:, 0]
    elif mode is ScanMode.BIDI:
        rows = y[:, 0] + y[:, 1].flip(-1)
    elif mode is ScanMode.CROSS2D:
        rows = y[:, 0] + y[:, 2].flip(-1)
        cols = y[:, 1] + y[:, 3].flip(-1)
        rows = rows + cols.view(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, -1)
    else:
        raise ValueError("cascade2d scans rows then columns inside SS2D; it has no cross_merge routes")
    out = rows.view(batch, channels, height, width)
    return out.permute(0, 2, 3, 1) if channel_last else out

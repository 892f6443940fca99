"""VSS block, MLP, stems and downsampling layers."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .norm import LayerNorm, NormKind, make_activation, make_linear, make_norm, to_channel_first, to_channel_last
from .ss2d import SS2D, SS2DConfig


class Mlp(nn.Module):
    """fc1 → act → dropout → fc2 → dropout; per-pixel, in either layout. ``gated`` splits fc1 into x·act(z)."""

    def __init__(self, dim: int, hidden: int, act: str, dropout: float, channel_first: bool,
                 gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.channel_dim = 1 if channel_first else -1
        self.fc1 = make_linear(dim, hidden * (2 if gated else 1), True, channel_first)
        self.act = make_activation(act)
        self.fc2 = make_linear(hidden, dim, True, channel_first)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.gated:
            x, z = x.chunk(2, dim=self.channel_dim)
            x = x * self.act(z)
        else:
            x = self.act(x)
        return self.drop(self.fc2(self.drop(x)))


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(norm(x))), then x + drop_path(MLP(norm2(x))) when mlp_ratio > 0."""

    def __init__(self, dim: int, ssm: SS2DConfig, norm: NormKind, mlp_ratio: float, mlp_act: str,
                 mlp_dropout: float, drop_path: float, gated_mlp: bool = False) -> None:
        super().__init__()
        channel_first = norm.channel_first
        self.norm = make_norm(norm, dim)
        self.op = SS2D(dim, ssm, channel_first)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.has_mlp = mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = make_norm(norm, dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act, mlp_dropout, channel_first, gated_mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = self._residual(x, self.op(self.norm(x)))
        if self.has_mlp:
            x = self._residual(x, self.mlp(self.norm2(x)))
        return x

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + drop_path(branch). In training the per-sample scale multiplies inside one ``addcmul``: a
        separate multiply would read and write the whole branch once more (timm's DropPath, same masks)."""
        drop = self.drop_path
        if not (isinstance(drop, DropPath) and drop.training and drop.drop_prob > 0):
            return x + branch
        keep = 1.0 - drop.drop_prob
        scale = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
        if drop.scale_by_keep and keep > 0:
            scale.div_(keep)
        return torch.addcmul(x, branch, scale)


class StemKind(str, enum.Enum):
    """Patch embedding (stride 4)."""

    V1 = "v1"  # conv k4 s4 → norm
    V2 = "v2"  # conv k3 s2 → norm → GELU → conv k3 s2 → norm


class DownsampleKind(str, enum.Enum):
    """Resolution halving between stages."""

    V1 = "v1"  # patch merging: 2x2 neighbours concatenated → LayerNorm(4C) → Linear
    V2 = "v2"  # conv k2 s2 → norm
    V3 = "v3"  # conv k3 s2 p1 → norm
    NONE = "none"


def make_stem(kind: StemKind, in_chans: int, dim: int, patch_size: int, norm: NormKind,
              patch_norm: bool = True) -> nn.Sequential:
    """The patch embedding; Sequential indices match the published state-dict keys in both layouts."""
    channel_first = norm.channel_first

    def norm_layer(channels: int) -> nn.Module:
        return make_norm(norm, channels) if patch_norm else nn.Identity()

    if kind is StemKind.V1:
        return nn.Sequential(
            nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=True),
            to_channel_last(channel_first),
            norm_layer(dim),
        )
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, stride=2, padding=1, bias=True),
        to_channel_last(channel_first),
        norm_layer(half),
        to_channel_first(channel_first),
        nn.GELU(),
        nn.Conv2d(half, dim, 3, stride=2, padding=1, bias=True),
        to_channel_last(channel_first),
        norm_layer(dim),
    )


class PatchMerging2D(nn.Module):
    """Concatenate each 2x2 neighbourhood (zero-padding odd sizes), LayerNorm(4C), Linear(4C → out)."""

    def __init__(self, dim: int, out_dim: int, norm: NormKind) -> None:
        super().__init__()
        self.channel_first = norm.channel_first
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        height, width = x.shape[1], x.shape[2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        x = self.reduction(self.norm(x))
        return x.permute(0, 3, 1, 2) if self.channel_first else x


def make_downsample(kind: DownsampleKind, dim: int, out_dim: int, norm: NormKind) -> nn.Module:
    """Downsampling between stages; indices 1 and 3 hold the conv and norm as in the published keys."""
    if kind is DownsampleKind.NONE:
        return nn.Identity()
    if kind is DownsampleKind.V1:
        return PatchMerging2D(dim, out_dim, norm)
    channel_first = norm.channel_first
    conv = (nn.Conv2d(dim, out_dim, 2, stride=2) if kind is DownsampleKind.V2
            else nn.Conv2d(dim, out_dim, 3, stride=2, padding=1))
    return nn.Sequential(to_channel_first(channel_first), conv, to_channel_last(channel_first),
                         make_norm(norm, out_dim))


__all__ = ["DownsampleKind", "Mlp", "PatchMerging2D", "StemKind", "VSSBlock", "make_downsample", "make_stem"]

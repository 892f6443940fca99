"""Norms, per-pixel linear layers and small layout helpers shared by the VMamba layers."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.layer_norm import layer_norm


class NormKind(str, enum.Enum):
    """Normalisation layer; it also fixes the tensor layout between layers."""

    LAYERNORM = "ln"  # channel-last (B, H, W, C)
    LAYERNORM2D = "ln2d"  # channel-first (B, C, H, W)
    BATCHNORM = "bn"  # channel-first (B, C, H, W)

    @property
    def channel_first(self) -> bool:
        return self is not NormKind.LAYERNORM


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) over the last dim through :func:`layer_norm`:
    Triton kernels for contiguous CUDA rows, ``F.layer_norm`` otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a (B, C, H, W) map; same parameters as nn.LayerNorm.

    A channels-last map has a contiguous NHWC view, which the Triton kernels take without a copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """The norm layer of ``kind`` for ``channels`` features (eps 1e-5, affine)."""
    if kind is NormKind.LAYERNORM:
        return LayerNorm(channels)
    if kind is NormKind.LAYERNORM2D:
        return LayerNorm2d(channels)
    return nn.BatchNorm2d(channels)


class Linear2d(nn.Linear):
    """A per-pixel linear layer on (B, C, H, W) maps (a 1x1 convolution).

    It runs as a plain matrix product in whichever memory layout the map has (NCHW: weight @ x per
    image; channels-last: F.linear over the NHWC view), which avoids the layout reorders a 1x1
    convolution pays on the CPU. The weight stays 2-D (out, in) like nn.Linear; a 4-D (out, in, 1, 1)
    checkpoint weight is accepted.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.is_contiguous():
            batch, _, height, width = x.shape
            out = torch.matmul(self.weight, x.flatten(2))
            if self.bias is not None:
                out = out + self.bias[:, None]
            return out.view(batch, -1, height, width)
        if x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[key] = weight[:, :, 0, 0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def make_linear(in_features: int, out_features: int, bias: bool, channel_first: bool) -> nn.Linear:
    """nn.Linear for channel-last maps, Linear2d for channel-first ones (same state-dict entries)."""
    return (Linear2d if channel_first else nn.Linear)(in_features, out_features, bias=bias)


class Permute(nn.Module):
    """x.permute(*dims) as a module (keeps the published state-dict indices of Sequentials)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def to_channel_last(channel_first: bool) -> nn.Module:
    """Permute NCHW→NHWC when the model works channel-last; identity otherwise."""
    return nn.Identity() if channel_first else Permute(0, 2, 3, 1)


def to_channel_first(channel_first: bool) -> nn.Module:
    """Permute NHWC→NCHW when the model works channel-last; identity otherwise."""
    return nn.Identity() if channel_first else Permute(0, 3, 1, 2)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (silu, gelu, relu, sigmoid, identity)."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def coerce_enum_fields(config: object, fields: dict[str, type[enum.Enum]]) -> None:
    """Turn the named fields of a frozen dataclass into their enums; unknown values raise a ValueError
    that names the field and lists the choices."""
    for field, enum_type in fields.items():
        value = getattr(config, field)
        try:
            object.__setattr__(config, field, enum_type(value))
        except ValueError:
            choices = ", ".join(e.value for e in enum_type)
            raise ValueError(f"{type(config).__name__}.{field}: unknown value {value!r}; "
                             f"choose one of {choices}") from None


__all__ = [
    "ACTIVATIONS", "LayerNorm", "LayerNorm2d", "Linear2d", "NormKind", "Permute", "coerce_enum_fields",
    "make_activation", "make_linear", "make_norm", "to_channel_first", "to_channel_last",
]

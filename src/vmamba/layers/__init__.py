"""Building blocks of VMamba models."""

from .blocks import DownsampleKind, Mlp, PatchMerging2D, StemKind, VSSBlock, make_downsample, make_stem
from .norm import LayerNorm, LayerNorm2d, Linear2d, NormKind, Permute, make_activation, make_linear, make_norm
from .ss2d import SS2D, GateMode, InitScheme, OutNormKind, SS2DConfig, SSMCore

__all__ = [
    "SS2D", "DownsampleKind", "GateMode", "InitScheme", "LayerNorm", "LayerNorm2d", "Linear2d", "Mlp", "NormKind",
    "OutNormKind", "PatchMerging2D", "Permute", "SS2DConfig", "SSMCore", "StemKind", "VSSBlock",
    "make_activation", "make_downsample", "make_linear", "make_norm", "make_stem",
]

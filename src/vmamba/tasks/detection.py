"""Detection and instance segmentation with torchvision on VMamba backbones.

:class:`VMambaFPN` wraps :class:`vmamba.VSSMBackbone` (the published detection backbone: normalised
NCHW maps of each stage, keys ``outnorm{i}``) with torchvision's FeaturePyramidNetwork, giving the
``OrderedDict`` of 256-channel maps and ``out_channels`` that torchvision's detectors expect.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..models import create_model
from ..pretrained import IMAGENET_MEAN, IMAGENET_STD


def _torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise ImportError("detection needs torchvision: pip install 'vmamba[detection]'") from None
    from torchvision.models import detection
    from torchvision.ops import feature_pyramid_network as fpn

    return detection, fpn


class VMambaFPN(nn.Module):
    """VMamba backbone + FPN: ``forward(images) -> OrderedDict[str, Tensor]`` of ``out_channels`` maps.

    ``extra`` adds coarser levels: "pool" (max-pool P6, Faster/Mask R-CNN), "p6p7" (RetinaNet) or None.
    """

    def __init__(self, name: str = "vmamba_tiny_s1l8", out_indices: Sequence[int] = (0, 1, 2, 3),
                 out_channels: int = 256, checkpoint: str | os.PathLike | None = None, extra: str | None = "pool",
                 **overrides: Any) -> None:
        super().__init__()
        _, fpn = _torchvision()
        self.body = create_model(name, features_only=True, out_indices=tuple(out_indices),
                                 checkpoint_path=checkpoint, **overrides)
        in_channels = [self.body.dims[i] for i in self.body.out_indices]
        if extra == "pool":
            extra_blocks = fpn.LastLevelMaxPool()
        elif extra == "p6p7":
            extra_blocks = fpn.LastLevelP6P7(out_channels, out_channels)
        elif extra is None:
            extra_blocks = None
        else:
            raise ValueError(f"extra must be 'pool', 'p6p7' or None, got {extra!r}")
        self.fpn = fpn.FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("image_mean", list(IMAGENET_MEAN))
    kwargs.setdefault("image_std", list(IMAGENET_STD))
    return kwargs


def maskrcnn_vmamba(name: str = "vmamba_tiny_s1l8", num_classes: int = 81,
                    checkpoint: str | os.PathLike | None = None, fpn_channels: int = 256,
                    backbone_overrides: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """torchvision Mask R-CNN on VMamba + FPN (the paper's COCO setting uses ``vmamba_tiny_s1l8`` etc.).

    ``num_classes`` includes the background. ``checkpoint``: classification weights for the backbone.
    ``backbone_overrides``: VMamba configuration fields; other keyword arguments go to ``MaskRCNN``
    (``min_size``, ``max_size``, ``box_detections_per_img``, ...).
    """
    detection, _ = _torchvision()
    backbone = VMambaFPN(name, out_channels=fpn_channels, checkpoint=checkpoint, extra="pool",
                         **(backbone_overrides or {}))
    return detection.MaskRCNN(backbone, num_classes=num_classes, **_defaults(kwargs))


def fasterrcnn_vmamba(name: str = "vmamba_tiny_s1l8", num_classes: int = 81,
                      checkpoint: str | os.PathLike | None = None, fpn_channels: int = 256,
                      backbone_overrides: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """torchvision Faster R-CNN on VMamba + FPN (arguments as :func:`maskrcnn_vmamba`)."""
    detection, _ = _torchvision()
    backbone = VMambaFPN(name, out_channels=fpn_channels, checkpoint=checkpoint, extra="pool",
                         **(backbone_overrides or {}))
    return detection.FasterRCNN(backbone, num_classes=num_classes, **_defaults(kwargs))


def retinanet_vmamba(name: str = "vmamba_tiny_s1l8", num_classes: int = 80,
                     checkpoint: str | os.PathLike | None = None, fpn_channels: int = 256,
                     backbone_overrides: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """torchvision RetinaNet on VMamba stages 2-4 + FPN with P6/P7 (``num_classes`` without background)."""
    detection, _ = _torchvision()
    backbone = VMambaFPN(name, out_indices=(1, 2, 3), out_channels=fpn_channels, checkpoint=checkpoint,
                         extra="p6p7", **(backbone_overrides or {}))
    return detection.RetinaNet(backbone, num_classes=num_classes, **_defaults(kwargs))


__all__ = ["VMambaFPN", "fasterrcnn_vmamba", "maskrcnn_vmamba", "retinanet_vmamba"]

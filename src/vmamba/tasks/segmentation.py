"""Semantic segmentation with segmentation_models_pytorch on VMamba encoders.

Every registered model is a timm model (``import vmamba`` registers them), so smp reaches it as
``encoder_name="tu-<model>"``; smp asks timm for ``features_only=True`` maps at strides 4-32.
:func:`upernet_vmamba` builds the published setting: UperNet on a VMamba backbone for 512x512 crops
(ADE20K: 150 classes, decoder width 512). Training recipe of the paper, for reference:
:data:`PUBLISHED_SETTING`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..pretrained import IMAGENET_MEAN, IMAGENET_STD

PUBLISHED_SETTING: dict[str, Any] = dict(
    architecture="upernet",
    crop_size=(512, 512),
    num_classes=150,  # ADE20K
    decoder_channels=512,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    optimizer="AdamW", lr=6e-5, weight_decay=0.01, betas=(0.9, 0.999),
    schedule="linear warmup 1500 iters, then poly (power 1) to 0 at 160k iters",
    batch_size=16,
    notes="the authors also train an auxiliary FCN head on stage 3 (weight 0.4), not reproduced here",
)

ARCHITECTURES = ("upernet", "fpn", "unet")


def _require_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ImportError("segmentation needs segmentation_models_pytorch: pip install 'vmamba[seg]'") from None
    return smp


def segmentation_model(arch: str, name: str = "vmamba_tiny_s1l8", num_classes: int = 150,
                       encoder_checkpoint: str | os.PathLike | None = None, in_channels: int = 3,
                       decoder_kwargs: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """An smp ``arch`` ("upernet", "fpn", "unet", or any smp architecture) with a VMamba encoder.

    ``encoder_checkpoint``: classification weights (safetensors or weights-only) for the encoder.
    ``overrides``: configuration fields of the VMamba model (e.g. ``drop_path_rate=0.3``).
    """
    smp = _require_smp()
    import vmamba  # noqa: F401  (registers the models with timm)

    encoder_kwargs: dict[str, Any] = dict(overrides)
    if encoder_checkpoint is not None:
        encoder_kwargs["pretrained_cfg_overlay"] = dict(file=str(encoder_checkpoint))
    return smp.create_model(
        arch, encoder_name=f"tu-{name}", encoder_weights=True if encoder_checkpoint else None,
        in_channels=in_channels, classes=num_classes, **(decoder_kwargs or {}), **encoder_kwargs,
    )


def upernet_vmamba(name: str = "vmamba_tiny_s1l8", num_classes: int = PUBLISHED_SETTING["num_classes"],
                   encoder_checkpoint: str | os.PathLike | None = None,
                   decoder_channels: int = PUBLISHED_SETTING["decoder_channels"], in_channels: int = 3,
                   **overrides: Any) -> nn.Module:
    """UperNet on a VMamba backbone (the paper's segmentation setting, for 512x512 inputs).

    Output: logits (B, num_classes, H, W) at the input resolution.
    """
    return segmentation_model("upernet", name, num_classes, encoder_checkpoint, in_channels,
                              dict(decoder_channels=decoder_channels), **overrides)


__all__ = ["ARCHITECTURES", "PUBLISHED_SETTING", "segmentation_model", "upernet_vmamba"]

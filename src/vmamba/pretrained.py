"""Metadata of the ImageNet-1K checkpoints published by the VMamba authors.

The checkpoints are the ``.pth`` files attached to the releases of https://github.com/MzeroMiko/VMamba
(tables in its ``assets/performance.md``). They pickle a training configuration object besides the
weights, so they are read with :mod:`vmamba.tools.safe_pickle` (never ``torch.load``) and can be turned
into safetensors with ``vmamba convert``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download"
ORIGIN_URL = "https://github.com/MzeroMiko/VMamba"
PAPER_ID = "arXiv:2401.10166"
PAPER_NAME = "VMamba: Visual State Space Model"
LICENSE = "mit"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PublishedCheckpoint:
    """One published classification checkpoint."""

    url: str
    top1: float  # ImageNet-1K top-1 reported by the authors at 224x224
    params_m: float  # parameters in millions, as reported
    release: str  # GitHub release tag


def _release(tag: str, filename: str) -> str:
    return f"{RELEASES}/%23{tag}/{filename}"  # '#' in the tag is URL-encoded


PUBLISHED: dict[str, PublishedCheckpoint] = {
    "vanilla_vmamba_tiny": PublishedCheckpoint(_release("v0cls", "vssmtiny_dp01_ckpt_epoch_292.pth"), 82.2, 23,
                                               "#v0cls"),
    "vanilla_vmamba_small": PublishedCheckpoint(_release("v0cls", "vssmsmall_dp03_ckpt_epoch_238.pth"), 83.5, 44,
                                                "#v0cls"),
    "vanilla_vmamba_base": PublishedCheckpoint(_release("v0cls", "vssmbase_dp06_ckpt_epoch_241.pth"), 83.7, 76,
                                               "#v0cls"),
    "vmamba_tiny_s2l5": PublishedCheckpoint(_release("v2cls", "vssm_tiny_0230_ckpt_epoch_262.pth"), 82.5, 31,
                                            "#v2cls"),
    "vmamba_small_s2l15": PublishedCheckpoint(_release("v2cls", "vssm_small_0229_ckpt_epoch_222.pth"), 83.6, 50,
                                              "#v2cls"),
    "vmamba_base_s2l15": PublishedCheckpoint(_release("v2cls", "vssm_base_0229_ckpt_epoch_237.pth"), 83.9, 89,
                                             "#v2cls"),
    "vmamba_tiny_s1l8": PublishedCheckpoint(_release("v2cls", "vssm1_tiny_0230s_ckpt_epoch_264.pth"), 82.6, 30,
                                            "#v2cls"),
    "vmamba_small_s1l20": PublishedCheckpoint(_release("v2cls", "vssm1_small_0229s_ckpt_epoch_240.pth"), 83.3, 49,
                                              "#v2cls"),
    "vmamba_base_s1l20": PublishedCheckpoint(_release("v2cls", "vssm1_base_0229s_ckpt_epoch_225.pth"), 83.8, 87,
                                             "#v2cls"),
}

# Tag of the ImageNet-1K weights in timm names ("vmamba_tiny_s1l8.in1k").
TAG = "in1k"


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields for model ``name`` (no ``url`` when nothing was published)."""
    published = PUBLISHED.get(name)
    cfg: dict[str, Any] = dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        fixed_input_size=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv="patch_embed.0",
        classifier="classifier.head",
        license=LICENSE,
        paper_ids=PAPER_ID,
        paper_name=PAPER_NAME,
        origin_url=ORIGIN_URL,
    )
    if published is not None:
        # The published files pickle a yacs config: they are read by our restricted unpickler
        # through VSSM.load_pretrained, never by torch.load.
        cfg.update(url=published.url, custom_load=True,
                   notes=(f"ImageNet-1K top-1 {published.top1} (authors' report), release {published.release}",))
    else:
        cfg.update(notes=("no checkpoint published by the authors",))
    return cfg


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LICENSE", "PAPER_ID", "PUBLISHED", "PublishedCheckpoint", "TAG",
           "pretrained_cfg"]

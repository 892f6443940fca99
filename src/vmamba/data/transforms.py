"""Train and eval transforms, built with timm's ``create_transform``."""

from __future__ import annotations

from collections.abc import Sequence


def build_train_transform(img_size: int, *, interpolation: str = "bicubic", scale: Sequence[float] = (0.08, 1.0),
                          hflip: float = 0.5, color_jitter: float = 0.4, auto_augment: str | None = None,
                          re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1,
                          mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
    """RandomResizedCrop + flip + RandAugment / colour jitter + normalise + random erasing."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, scale=tuple(scale), hflip=hflip,
                            color_jitter=color_jitter if color_jitter > 0 else None,
                            auto_augment=auto_augment or None, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), re_prob=re_prob, re_mode=re_mode, re_count=re_count)


def build_eval_transform(img_size: int, *, interpolation: str = "bicubic", crop_pct: float = 0.875,
                         mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
    """Resize the short side to img_size / crop_pct (bicubic by default), centre-crop img_size, normalise."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=tuple(mean), std=tuple(std))

"""Helpers shared by the analysis tools: building ours-or-timm models, parsing options, plotting."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_vmamba_model(name: str) -> bool:
    from .. import list_models

    return name in list_models()


def build_model(name: str, num_classes: int | None = None, checkpoint: str | os.PathLike | None = None,
                img_size: tuple[int, int] | None = None, **overrides: Any) -> nn.Module:
    """A registered VMamba model, or any timm model by name (random weights unless ``checkpoint``).

    ``overrides`` are VMamba configuration fields (e.g. ``scan_mode="bidi"``) for our models and
    keyword arguments of ``timm.create_model`` otherwise. ``img_size`` is passed to timm models that
    fix their input size at construction (ViT, Swin); VMamba models take any size.
    """
    from .. import create_model

    if is_vmamba_model(name):
        return create_model(name, num_classes=num_classes, checkpoint_path=checkpoint, **overrides)
    import timm

    if not timm.is_model(name):
        from .. import list_models

        raise ValueError(f"unknown model {name!r}: neither a VMamba model ({', '.join(list_models())}) "
                         "nor a timm model")
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint is not None:
        kwargs["checkpoint_path"] = str(checkpoint)
    model = None
    if img_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(name, pretrained=False, img_size=tuple(img_size), **kwargs)
        except TypeError:  # the model takes any input size
            model = None
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.model_name = name  # type: ignore[attr-defined]
    return model


def parse_value(text: str) -> Any:
    """A Python literal if ``text`` is one (numbers, tuples, booleans), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """``["d_state=4", "dims=[64,128,256,512]"]`` → ``{"d_state": 4, "dims": [64, 128, 256, 512]}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model option {item!r} is not of the form key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_checkpoints(items: Sequence[str] | None, models: Sequence[str]) -> dict[str, str]:
    """``--checkpoint PATH`` (one model) or ``--checkpoint NAME=PATH`` (several) → {model: path}."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if sep and name in models:
            out[name] = path
        elif len(models) == 1:
            out[models[0]] = item
        else:
            raise ValueError(f"--checkpoint {item!r}: with several models use NAME=PATH (models: {', '.join(models)})")
    for path in out.values():
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
    return out


def split_list(values: Sequence[str] | str | None) -> list[str]:
    """Accept ``a,b c`` style lists from argparse (nargs="+" and/or commas)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v for item in values for v in item.split(",") if v]


def parse_sizes(values: Sequence[str] | str | None, default: int = 224) -> list[tuple[int, int]]:
    """``224 512x384`` → [(224, 224), (512, 384)] as (height, width)."""
    sizes = []
    for item in split_list(values) or [str(default)]:
        h, _, w = item.lower().partition("x")
        try:
            sizes.append((int(h), int(w or h)))
        except ValueError:
            raise ValueError(f"bad image size {item!r}; use e.g. 224 or 256x192") from None
    for h, w in sizes:
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got {h}x{w}")
    return sizes


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def feature_map(model: nn.Module, x: Tensor) -> Tensor:
    """The last-stage feature map of ``model`` for images ``x``, as (B, C, H, W).

    VMamba and CNNs return NCHW or NHWC maps from ``forward_features``; ViTs return tokens, whose
    prefix (class/distillation) tokens are dropped and the rest folded back to a square grid.
    """
    out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if out.dim() == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = out[:, prefix:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot fold {tokens.shape[1]} tokens into a square grid")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    if out.dim() != 4:
        raise ValueError(f"forward_features returned a {out.dim()}-D tensor; expected a feature map")
    channels = getattr(model, "num_features", None)
    channel_last = getattr(model, "channel_first", None) is False
    if not channel_last and channels is not None and out.shape[1] != channels and out.shape[-1] == channels:
        channel_last = True  # e.g. timm Swin returns NHWC
    return out.permute(0, 3, 1, 2) if channel_last else out


def load_image(path: str | os.PathLike, size: tuple[int, int]) -> Tensor:
    """An RGB image resized (shorter side) and centre-cropped to ``size``, ImageNet-normalised: (3, H, W)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow comes with timm's dependencies
        raise ValueError("reading images needs Pillow: pip install pillow") from exc
    import numpy as np

    height, width = size
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width)
        new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(new, Image.BICUBIC)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
        data = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (data - mean) / std


def denormalize(image: Tensor) -> Tensor:
    """Inverse of the ImageNet normalisation, clamped to [0, 1]: (3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype)[:, None, None]
    return (image.cpu() * std + mean).clamp(0, 1)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, at most ``limit``."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files[:limit] if limit else files


def require_matplotlib():
    """Import matplotlib with the Agg backend, or explain how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("plots need matplotlib: pip install 'vmamba[plot]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table of ``rows`` (dicts), columns in first-seen order."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)

"""ImageFolder / ImageNet-layout datasets with clear errors instead of tracebacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS


class DataError(ValueError):
    """A data folder or image that cannot be used; the message names it."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, raising a DataError that names the file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise DataError(f"unreadable image {path}: {type(exc).__name__}: {exc}") from None


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{what} is not a folder: {root}")
    classes = [d for d in sorted(root.iterdir()) if d.is_dir()]
    if not classes:
        raise DataError(f"{what} folder {root} is empty: expected one sub-folder of images per class")
    for d in classes:
        for _, _, files in os.walk(d, followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
    raise DataError(f"{what} folder {root} has class folders but no images "
                    f"(looked for {', '.join(IMG_EXTENSIONS)})")


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder that names the folder when it is missing or empty and the file when an
    image cannot be decoded. Class folders without images are allowed (they keep their index)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, what: str = "data") -> None:
        _check_folder(Path(root), what)
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)


def resolve_split(data: str | os.PathLike, split: str) -> Path:
    """``DIR/split`` when it exists (ImageNet layout); for ``val``, also ``DIR/validation``."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    names = (split, "validation") if split == "val" else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"data folder {root} has no {split}/ sub-folder (expected {root}/{split}/<class>/<image>)")

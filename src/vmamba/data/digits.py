"""scikit-learn's digits (1,797 real 8x8 grey images of 0-9) as a torchvision-style image dataset.

It ships inside scikit-learn, so ``vmamba train`` runs with no download and no data folder. Images are
returned as 8x8 RGB PIL images; the transforms resize them to the model's input size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DIGITS_CLASSES = [str(i) for i in range(10)]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is in the train extra
        raise ValueError("the built-in digits dataset needs scikit-learn: pip install 'vmamba[train]'") from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # (N, 8, 8), values 0..16
    return (images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed, class-stratified train/val split (the same on every machine)."""
    _, targets = _load_digits()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(Dataset):
    """The train or val split of scikit-learn's digits; items are ``(PIL RGB image, label)``."""

    classes = DIGITS_CLASSES

    def __init__(self, split: str = "train", transform: Callable | None = None, val_fraction: float = 0.2,
                 seed: int = 0) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"digits split must be 'train', 'val' or 'all', got {split!r}")
        images, targets = _load_digits()
        if split == "all":
            index = np.arange(len(targets))
        else:
            train, val = digits_split(val_fraction, seed)
            index = train if split == "train" else val
        self.images = images[index]
        self.targets = [int(t) for t in targets[index]]
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def __getitem__(self, i: int):
        img = self.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

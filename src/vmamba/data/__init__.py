"""Datasets and transforms for training: the built-in digits set and ImageFolder layouts."""

from .digits import DIGITS_CLASSES, DigitsDataset, digits_split
from .folder import CheckedImageFolder, DataError, load_rgb, resolve_split
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "DIGITS_CLASSES", "CheckedImageFolder", "DataError", "DigitsDataset", "build_eval_transform",
    "build_train_transform", "digits_split", "load_rgb", "resolve_split",
]

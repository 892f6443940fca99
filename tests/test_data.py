"""Digits dataset, ImageFolder checks and transforms."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vmamba.data import (
    CheckedImageFolder,
    DataError,
    DigitsDataset,
    build_eval_transform,
    build_train_transform,
    digits_split,
    load_rgb,
    resolve_split,
)


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = digits_split()
    assert len(train) + len(val) == 1797 and not set(train) & set(val)
    again = digits_split()
    assert (again[0] == train).all() and (again[1] == val).all()
    ds = DigitsDataset("val")
    counts = torch.bincount(torch.tensor(ds.targets), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    img, label = ds[0]
    assert img.size == (8, 8) and img.mode == "RGB" and 0 <= label < 10
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")


def test_transforms_resize_digits():
    ds = DigitsDataset("train", transform=build_eval_transform(32, crop_pct=1.0))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    tf = build_train_transform(32, scale=(0.7, 1.0), hflip=0.0, color_jitter=0.0, auto_augment="rand-m9-mstd0.5-inc1",
                               re_prob=0.25)
    assert DigitsDataset("train", transform=tf)[3][0].shape == (3, 32, 32)
    text = repr(build_eval_transform(224))
    assert "bicubic" in text and "256" in text  # 224 / 0.875


def test_image_folder_and_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_split(tmp_path / "absent", "train")
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (10, 12), "red").save(tmp_path / "train" / name / "a.jpg")
    (tmp_path / "validation" / "cat").mkdir(parents=True)
    assert resolve_split(tmp_path, "val") == tmp_path / "validation"
    with pytest.raises(DataError, match="no images"):
        CheckedImageFolder(tmp_path / "validation")
    ds = CheckedImageFolder(resolve_split(tmp_path, "train"))
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    bad = tmp_path / "train" / "dog" / "b.png"
    bad.write_bytes(b"not an image")
    ds = CheckedImageFolder(tmp_path / "train")
    with pytest.raises(DataError, match="b.png"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(DataError, match="unreadable image"):
        load_rgb(bad)

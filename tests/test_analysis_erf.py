"""ERF: gradient maps, normalisation, area ratios, image folders, the erf command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vmamba.analysis.erf import (
    area_ratios,
    compute_erf,
    input_batches,
    log_scale,
    pixel_area_ratio,
    square_area_ratio,
)
from vmamba.cli import main


class _Conv(nn.Module):
    """One 3x3 conv, stride 1: the ERF of the centre is exactly the 3x3 neighbourhood."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.model_name = "conv3"

    def forward_features(self, x):
        return self.conv(x)


def test_erf_of_a_single_conv_is_its_kernel_footprint():
    res = compute_erf(_Conv(), (9, 9), num_images=3, batch_size=2, target="sum")
    assert res.raw.shape == (9, 9) and res.images == 3
    support = (res.raw > 0).nonzero().tolist()
    assert {tuple(p) for p in support} <= {(r, c) for r in range(3, 6) for c in range(3, 6)}
    assert (res.raw[3:6, 3:6] > 0).all()
    assert res.scaled.max().item() == pytest.approx(1.0) and res.scaled.min() >= 0
    assert square_area_ratio(res.raw, 0.99) == pytest.approx(9 / 81)


def test_area_ratios_and_scaling():
    uniform = torch.ones(10, 10)
    assert pixel_area_ratio(uniform, 0.5) == pytest.approx(0.5)
    assert square_area_ratio(uniform, 0.5) == pytest.approx(0.64)  # 8x8 is the first square >= 50 %
    delta = torch.zeros(10, 10)
    delta[5, 5] = 3.0
    assert square_area_ratio(delta, 0.99) == pytest.approx(0.04)  # the centred 2x2 square holds (5, 5)
    assert pixel_area_ratio(delta, 0.99) == pytest.approx(0.01)
    ratios = area_ratios(torch.rand(16, 16) + 1)
    assert ratios["square20"] <= ratios["square50"] <= ratios["square99"] <= 1
    assert ratios["pixels20"] <= ratios["pixels50"] <= ratios["pixels99"] <= 1
    for scale in ("log1p", "log"):
        scaled = log_scale(torch.rand(5, 5) * 100, scale)
        assert scaled.max().item() == pytest.approx(1.0) and scaled.min() >= 0
    with pytest.raises(ValueError):
        log_scale(torch.rand(3, 3), "cubic")


def test_input_batches_random_and_folder(tmp_path):
    batches = list(input_batches((8, 6), 5, 2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and batches[0].shape[1:] == (3, 8, 6)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 12), (40 * i, 100, 200)).save(tmp_path / f"im{i}.png")
    loaded = list(input_batches((8, 8), 2, 4, folder=str(tmp_path)))
    assert len(loaded) == 1 and loaded[0].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        list(input_batches((8, 8), 2, 4, folder=str(tmp_path / "im0.png")))


def test_erf_of_vmamba_is_global_and_normalised():
    from vmamba import create_model

    model = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1))
    res = compute_erf(model, (64, 64), num_images=2, batch_size=2)
    assert res.raw.shape == (64, 64)
    assert res.scaled.max().item() == pytest.approx(1.0)
    summary = res.summary()
    assert 0 < summary["square20"] <= summary["square50"] <= summary["square99"] <= 1
    assert summary["model"] == "vmamba_tiny_s1l8"
    # channel-last models give the same kind of map
    cl = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), channel_first=False)
    assert compute_erf(cl, (64, 64), num_images=1).raw.shape == (64, 64)


def test_erf_command(tmp_path, capsys):
    out, js = tmp_path / "erf.png", tmp_path / "erf.json"
    args = ["erf", "vmamba_tiny_s1l8", "resnet18", "--img-size", "64", "--num-images", "2", "--opt", "dims=8",
            "--opt", "depths=(1,1,1,1)", "--json", str(js), "--save-maps", str(tmp_path / "maps.pt")]
    pytest.importorskip("matplotlib")
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(js.read_text())
    assert [r["model"] for r in rows] == ["vmamba_tiny_s1l8", "resnet18"]
    assert out.stat().st_size > 1000
    maps = torch.load(tmp_path / "maps.pt", weights_only=True)
    assert maps["resnet18"]["raw"].shape == (64, 64)
    assert main(["erf", "vmamba_tiny_s1l8", "resnet18", "--checkpoint", "missing.pth"]) == 2

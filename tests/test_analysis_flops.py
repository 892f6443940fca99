"""FLOPs in the published convention against the reference model card, and the flops command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import model_card

from vmamba.analysis.flops import count_flops, count_model_flops, fvcore_einsum_flops
from vmamba.cli import main

CARD = model_card()


def _card_build(name: str) -> tuple[str, dict]:
    if name.endswith("_channel_last"):
        return name[: -len("_channel_last")], {"channel_first": False}
    if name.startswith("backbone_"):
        return name[len("backbone_"):], {"features_only": True}
    return name, {}


@pytest.mark.parametrize("card_name", sorted(CARD))
def test_flops_match_model_card(card_name):
    name, overrides = _card_build(card_name)
    report = count_model_flops(name, 224, **overrides)
    row = CARD[card_name]
    expected = int(row["flops_224"])
    assert report.params == int(row["params_with_head"])
    assert abs(report.flops - expected) / expected < 0.01, (report.flops, expected)
    # The emulation of fvcore is exact (up to the card's documented float rounding).
    assert abs(report.flops - expected) <= 2, (report.flops, expected)
    assert abs(report.gflops - float(row["gflops_224"])) < 1e-3


def test_scan_formula_and_conventions():
    report = count_model_flops("vmamba_tiny_s1l8", 224)
    # VMamba-T[s1l8]: 4 routes x d_inner, d_state 1 per stage (reference per-operator breakdown).
    assert report.by_operator["selective_scan_fwd"] == 63_221_760
    assert report.by_operator["native_layer_norm"] == 29_729_280
    assert report.by_operator["mean"] == 37_632
    depths = (2, 2, 8, 2)
    expected_scan = sum(n * (9 * L * 4 * d + L * 4 * d) for n, (L, d) in zip(depths, (
        (3136, 96), (784, 192), (196, 384), (49, 768))))
    assert report.by_operator["selective_scan_fwd"] == expected_scan
    torch_report = count_model_flops("vmamba_tiny_s1l8", 224, convention="torch")
    macs = report.flops - 63_221_760 - 29_729_280 - 37_632
    assert torch_report.flops == 2 * macs + 63_221_760
    excluded = count_model_flops("vmamba_tiny_s1l8", 224, scan="exclude")
    assert excluded.flops == report.flops - 63_221_760
    m2 = count_model_flops("vmamba_tiny_m2", 224)
    assert not m2.scan_counted
    assert count_model_flops("vmamba_tiny_m2", 224, scan="include").flops > m2.flops
    # per-module breakdown adds up
    top = [v for k, v in report.by_module.items() if k.count(".") == 1]
    assert sum(top) == report.flops


def test_meta_count_equals_cpu_count_and_scales_with_batch():
    overrides = dict(dims=16, depths=(1, 1, 1, 1), d_state=2, num_classes=10)
    meta = count_model_flops("vmamba_tiny_s1l8", 64, **overrides)
    cpu = count_model_flops("vmamba_tiny_s1l8", 64, where="cpu", **overrides)
    fake = count_model_flops("vmamba_tiny_s1l8", 64, where="fake", **overrides)
    assert meta.flops == cpu.flops == fake.flops and meta.params == cpu.params == fake.params
    assert count_model_flops("vmamba_tiny_s1l8", 64, batch=3, **overrides).flops == 3 * meta.flops


def test_cuda_kernel_paths_are_counted_as_the_composition(monkeypatch):
    """On CUDA the fused SS2D core and the Triton LayerNorm are custom ops the counter cannot see
    into; counting switches them off, so the count is the same as on the CPU (paths forced here)."""
    import vmamba.ops.layer_norm as layer_norm
    from vmamba import create_model
    from vmamba.layers.ss2d import SS2D
    from vmamba.ops.ss2d_core import fused_core_enabled

    model = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=10)
    expected = count_flops(model, 64)
    monkeypatch.setattr(SS2D, "_uses_fused_core", lambda self, x: fused_core_enabled())
    monkeypatch.setattr(layer_norm, "_FORCE_TRITON", True)
    assert count_flops(model, 64).flops == expected.flops


def test_fvcore_einsum_rounding():
    # numpy prints the FLOP count with 4 significant digits, fvcore halves what it reads back.
    assert fvcore_einsum_flops("bkdl,kcd->bkcl", [(1, 4, 192, 3136), (4, 38, 192)]) == 91_500_000
    assert fvcore_einsum_flops("abc,abd->acd", [(2, 3, 5), (2, 3, 7)]) == 2 * 5 * 3 * 7


def test_backward_and_timm_counts():
    from vmamba.analysis._common import build_model

    model = build_model("resnet18", num_classes=10)
    fwd = count_flops(model, 64)
    both = count_flops(model, 64, backward=True)
    assert both.flops > 2 * fwd.flops
    assert fwd.params == sum(p.numel() for p in model.parameters())


def test_flops_command(tmp_path, capsys):
    out = tmp_path / "f.json"
    rc = main(["flops", "vmamba_tiny_s1l8", "--img-size", "224", "--depth", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "4,905,609,984" in text and "layers" in text
    data = json.loads(out.read_text())
    assert data[0]["flops"] == 4_905_609_984 and data[0]["params"] == 30_249_064
    assert main(["flops", "no_such_model"]) == 2
    assert main(["flops", "vmamba_tiny_s1l8", "--opt", "bogus_option=1"]) == 2
    assert main(["flops", "vmamba_tiny_s1l8", "--img-size", "abc"]) == 2


def test_count_flops_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    model.in_chans = 3
    report = count_flops(model, 8)
    assert model.training
    assert report.by_operator["convolution"] == 36 * 4 * 27

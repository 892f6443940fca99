"""Scan-mode ablation helper and command at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from vmamba.analysis.ablate import ablate_scan_modes
from vmamba.analysis.bench import BenchSettings
from vmamba.cli import main

TINY = {"dims": 8, "depths": (1, 1, 1, 1)}


def test_ablate_rows_cover_every_mode():
    settings = BenchSettings(batch_size=1, warmup=0, iters=1, device="cpu", modes=("infer",))
    rows, erfs = ablate_scan_modes("vmamba_tiny_s1l8", ["cross2d", "bidi", "unidi", "cascade2d"], (32, 32),
                                   settings, erf_images=1, erf_batch=1, overrides=TINY)
    assert [r["scan_mode"] for r in rows] == ["cross2d", "bidi", "unidi", "cascade2d"]
    by_mode = {r["scan_mode"]: r for r in rows}
    assert [by_mode[m]["routes"] for m in ("cross2d", "bidi", "unidi", "cascade2d")] == [4, 2, 1, 4]
    # fewer routes, fewer per-route parameters and scan FLOPs
    assert by_mode["unidi"]["params"] < by_mode["bidi"]["params"] < by_mode["cross2d"]["params"]
    assert by_mode["cascade2d"]["params"] == by_mode["cross2d"]["params"]
    assert by_mode["unidi"]["GFLOPs"] < by_mode["cross2d"]["GFLOPs"]
    for row in rows:
        assert row["infer_img_per_s"] > 0 and 0 < row["square50"] <= 1
    assert len(erfs) == 4 and erfs[0].raw.shape == (32, 32)
    with pytest.raises(ValueError, match="scan mode"):
        ablate_scan_modes("vmamba_tiny_s1l8", ["diagonal"], (32, 32), None, 0)
    with pytest.raises(ValueError, match="VMamba"):
        ablate_scan_modes("resnet18", ["bidi"], (32, 32), None, 0)


def test_ablate_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    rc = main(["ablate", "vmamba_tiny_s1l8", "--modes", "cross2d,unidi", "--img-size", "32", "--mode", "none",
               "--erf-images", "1", "--opt", "dims=8", "--opt", "depths=(1,1,1,1)", "--json", str(js),
               "--out", str(png)])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["scan_mode"] for r in rows] == ["cross2d", "unidi"] and "infer_img_per_s" not in rows[0]
    assert png.stat().st_size > 1000
    assert "scan_mode" in capsys.readouterr().out


def test_shared_weights_make_variants_differ_only_in_routes():
    from vmamba import create_model
    from vmamba.analysis.ablate import copy_shared_weights

    a = create_model("vmamba_tiny_s1l8", scan_mode="cross2d", **TINY)
    b = create_model("vmamba_tiny_s1l8", scan_mode="bidi", **TINY)
    copied = copy_shared_weights(b, a.state_dict())
    assert copied == len(b.state_dict())
    op_a, op_b = a.layers[0].blocks[0].op, b.layers[0].blocks[0].op
    assert torch.equal(op_b.x_proj_weight, op_a.x_proj_weight[:2])
    assert torch.equal(op_b.A_logs, op_a.A_logs[: op_b.A_logs.shape[0]])
    assert torch.equal(b.classifier.head.weight, a.classifier.head.weight)

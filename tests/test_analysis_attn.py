"""The SSM implicit attention against a brute force: perturb the scan input at j, read the output at i."""

from __future__ import annotations

import pytest
import torch

from vmamba.analysis.attn import (
    attention_map,
    full_attention,
    query_attention,
    route_orders,
    scan_inputs,
    ssm_matrix,
)
from vmamba.layers.ss2d import SS2D, SS2DConfig
from vmamba.ops import cross_merge, cross_scan, selective_scan_reference, use_backend


def _random_scan(batch=2, groups=2, per_group=3, state=4, length=7, dtype=torch.float64):
    channels = groups * per_group
    delta = torch.randn(batch, channels, length, dtype=dtype)
    A = -torch.rand(channels, state, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, groups, state, length, dtype=dtype)
    C = torch.randn(batch, groups, state, length, dtype=dtype)
    D = torch.randn(channels, dtype=dtype)
    bias = torch.randn(channels, dtype=dtype) * 0.5
    return delta, A, B, C, D, bias


@pytest.mark.parametrize("with_d", [False, True])
def test_ssm_matrix_matches_perturbation_of_reference_scan(with_d):
    delta, A, B, C, D, bias = _random_scan()
    D = D if with_d else None
    u = torch.randn(delta.shape, dtype=torch.float64)
    M = ssm_matrix(delta, A, B, C, D, bias)  # (b, KC, L, L)
    base = selective_scan_reference(u, delta, A, B, C, D, bias)
    length = u.shape[2]
    brute = torch.zeros_like(M)
    for j in range(length):
        bumped = u.clone()
        bumped[:, :, j] += 1.0
        brute[:, :, :, j] = selective_scan_reference(bumped, delta, A, B, C, D, bias) - base
    torch.testing.assert_close(M, brute, rtol=1e-9, atol=1e-10)
    # y = M u exactly, and M is lower triangular
    torch.testing.assert_close(torch.einsum("bdij,bdj->bdi", M, u), base, rtol=1e-9, atol=1e-10)
    assert M.triu(1).abs().max() == 0
    rows = ssm_matrix(delta, A, B, C, D, bias, rows=torch.tensor([5, 2]))
    torch.testing.assert_close(rows, M[:, :, [5, 2]])


def _module(mode="cross2d", core="v05", d_state=3):
    torch.manual_seed(1)
    cfg = SS2DConfig(d_state=d_state, ssm_ratio=1.0, core=core, scan_mode=mode, dt_rank=2)
    module = SS2D(8, cfg, channel_first=True).double()
    with torch.no_grad():  # lively, varied parameters so that every route differs
        module.A_logs.uniform_(-1.0, 0.5)
        module.dt_projs_bias.uniform_(-1.0, 0.5)
        module.Ds.normal_()
    return module


def _decoupled_scan(module, x, u):
    """Δ, B, C from x; the scan run (reference) on u; routes merged back to 2D."""
    inp = scan_inputs(module, x)
    us = cross_scan(u, module.config.scan_mode)
    ys = selective_scan_reference(us.reshape(inp.u.shape), inp.delta, inp.A, inp.B, inp.C, inp.D, inp.delta_bias)
    return cross_merge(ys.view(us.shape), x.shape[2], x.shape[3], module.config.scan_mode)


@pytest.mark.parametrize("mode,core", [("cross2d", "v05"), ("bidi", "v0"), ("unidi", "v05"), ("cross2d", "m0")])
def test_2d_attention_matches_brute_force(mode, core):
    module = _module(mode, core)
    height, width = 3, 4
    x = torch.randn(1, module.d_inner, height, width, dtype=torch.float64)
    # our recomputation of the scan inputs reproduces the module's own scan
    with use_backend("reference"):
        expected = module._scan_2d(x)
    # (SS2D rounds D and the Δ-bias to float32, hence the float32-level tolerance)
    torch.testing.assert_close(_decoupled_scan(module, x, x), expected, rtol=1e-5, atol=1e-6)
    full = full_attention(module, x, include_d=True, reduce=None)[0]  # (di, L, L) in pixel order
    base = _decoupled_scan(module, x, x)[0].flatten(1)  # (di, L)
    brute = torch.zeros_like(full)
    for q in range(height * width):
        u = x.clone()
        u.view(1, module.d_inner, -1)[:, :, q] += 1.0
        brute[:, :, q] = _decoupled_scan(module, x, u)[0].flatten(1) - base
    torch.testing.assert_close(full, brute, rtol=1e-8, atol=1e-10)
    # a query row equals the corresponding row of the full matrix
    row = query_attention(module, x, (1, 2), include_d=True)[0]
    torch.testing.assert_close(row.flatten(1), full[:, 1 * width + 2])
    routes = query_attention(module, x, (1, 2), include_d=False, per_route=True)[0]
    assert routes.shape[0] == module.routes
    torch.testing.assert_close(routes.sum(0).flatten(1), full_attention(module, x, reduce=None)[0][:, 6])
    reduced = full_attention(module, x, include_d=True, reduce="absmean", chunk=3)[0]
    torch.testing.assert_close(reduced, full.abs().mean(0))


def test_route_orders_match_reference_file():
    from conftest import reference_path

    lines = reference_path("cross_scan_orders.tsv").read_text().splitlines()[1:]
    expected = {}
    for line in lines:
        mode, scans, k, visited = line.split("\t")
        if mode == "cross2d" and scans == "0":
            expected[int(k)] = [int(v) for v in visited.split()]
    assert sorted(expected) == [0, 1, 2, 3]
    orders = route_orders("cross2d", 3, 4)
    for k, visited in expected.items():
        assert orders[k].tolist() == visited


def test_attention_map_through_the_fused_core(monkeypatch):
    """On CUDA, SS2D runs the fused core instead of _scan_2d: the map is captured all the same
    (forced here on the CPU under the Triton interpreter)."""
    pytest.importorskip("triton")
    from vmamba import create_model

    model = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), num_classes=0)
    image = torch.randn(3, 32, 32)
    reference = attention_map(model, image, stage=1, block=0)
    monkeypatch.setattr(SS2D, "_uses_fused_core", lambda self, x: True)
    fused = attention_map(model, image, stage=1, block=0)
    torch.testing.assert_close(fused.map, reference.map)


def test_attention_map_on_model_and_cascade_refused(tmp_path):
    from vmamba import create_model

    model = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), num_classes=0)
    image = torch.randn(3, 64, 64)
    res = attention_map(model, image, stage=1, block=0, full=True)
    assert res.grid == (8, 8) and res.map.shape == (8, 8) and res.route_maps.shape == (4, 8, 8)
    assert res.full.shape == (64, 64)
    torch.testing.assert_close(res.full[res.query[0] * 8 + res.query[1]].view(8, 8), res.map)
    assert res.summary()["routes"] == 4
    pytest.importorskip("matplotlib")
    from vmamba.analysis.attn import plot_attention

    plot_attention(res, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000
    channel_last = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), channel_first=False, num_classes=0)
    channel_last.load_state_dict(model.state_dict())
    res_cl = attention_map(channel_last, image, stage=1, block=0)
    torch.testing.assert_close(res_cl.map, res.map, rtol=1e-4, atol=1e-7)
    cascade = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), scan_mode="cascade2d")
    with pytest.raises(ValueError, match="cascade2d"):
        attention_map(cascade, image, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        attention_map(model, image, 5, 0)


def test_attn_command(tmp_path, capsys):
    import json

    from vmamba.cli import main

    out = tmp_path / "attn.json"
    rc = main(["attn", "vmamba_tiny_s1l8", "--img-size", "64", "--stage", "2", "--query", "1,2", "--full",
               "--opt", "dims=8", "--opt", "depths=(1,1,1,1)", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["query"] == [1, 2] and data["grid"] == [4, 4] and data["block"] == 0
    assert len(data["full"]) == 16 and len(data["map"]) == 4
    pytest.importorskip("matplotlib")
    from PIL import Image

    Image.new("RGB", (80, 64), (200, 30, 90)).save(tmp_path / "img.png")
    png = tmp_path / "attn.png"
    assert main(["attn", "vmamba_tiny_s1l8", "--img-size", "64", "--stage", "1", "--image", str(tmp_path / "img.png"),
                 "--opt", "dims=8", "--opt", "depths=(1,1,1,1)", "--include-d", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["attn", "resnet18"]) == 2
    assert main(["attn", "vmamba_tiny_s1l8", "--opt", "dims=8", "--opt", "depths=(1,1,1,1)", "--img-size", "64",
                 "--query", "9,9"]) == 2


def test_channel_chunking_gives_the_same_maps(monkeypatch):
    import vmamba.analysis.attn as attn

    module = _module("cross2d", "v0", d_state=2)
    x = torch.randn(1, module.d_inner, 3, 3, dtype=torch.float64)
    row = query_attention(module, x, (1, 1), include_d=True)
    full = full_attention(module, x, reduce="mean")
    monkeypatch.setattr(attn, "MEMORY_BUDGET", 1)
    torch.testing.assert_close(query_attention(module, x, (1, 1), include_d=True), row)
    torch.testing.assert_close(full_attention(module, x, reduce="mean"), full)

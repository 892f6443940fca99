"""Export: the pure-tensor scan, torch.export with a dynamic batch, ONNX via ``vmamba export``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vmamba
from vmamba.cli import main
from vmamba.ops import selective_scan_reference
from vmamba.ops.export import chunked_linear_scan, decompose_scans, has_custom_scan, selective_scan_tensor
from vmamba.tools.export import export_program, relative_error

# Two stages keep tracing fast and still cover stem, blocks, downsample and head.
TINY = dict(dims=(8, 16), depths=(1, 1))
TOL = 1e-4


@pytest.mark.parametrize("batch,groups,channels,state,length", [(2, 4, 3, 1, 7), (1, 4, 2, 16, 100),
                                                                 (2, 2, 3, 4, 1090), (1, 1, 2, 1, 64)])
def test_tensor_scan_matches_reference(batch, groups, channels, state, length):
    g = torch.Generator().manual_seed(length)
    kc = groups * channels
    kw = dict(dtype=torch.float64, generator=g)
    u, delta = torch.randn(batch, kc, length, **kw), torch.randn(batch, kc, length, **kw)
    A = -torch.rand(kc, state, **kw) - 0.05
    B, C = torch.randn(batch, groups, state, length, **kw), torch.randn(batch, groups, state, length, **kw)
    D, bias = torch.randn(kc, **kw), torch.randn(kc, **kw)
    expected = selective_scan_reference(u, delta, A, B, C, D, bias, True)
    torch.testing.assert_close(selective_scan_tensor(u, delta, A, B, C, D, bias, True), expected)
    torch.testing.assert_close(selective_scan_tensor(u, delta, A, B, C, None, None, False),
                               selective_scan_reference(u, delta, A, B, C, None, None, False))


def test_chunked_linear_scan_with_zero_decay():
    a = torch.rand(3, 200, dtype=torch.float64)
    a[:, 50] = 0.0
    b = torch.randn(3, 200, dtype=torch.float64)
    h, out = torch.zeros(3, dtype=torch.float64), []
    for t in range(200):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    torch.testing.assert_close(chunked_linear_scan(a, b, chunk=16), torch.stack(out, -1))


def test_torch_export_dynamic_batch():
    model = vmamba.create_model("vanilla_vmamba_tiny", num_classes=5, **TINY).eval()  # channel-last layout
    x = torch.randn(2, 3, 32, 32)
    program = export_program(model, x, decompose=False)
    assert has_custom_scan(program)  # the op stays one node until decomposed
    portable = decompose_scans(program)
    assert not has_custom_scan(portable)
    with torch.no_grad():
        for batch in (1, 3):
            xb = torch.randn(batch, 3, 32, 32)
            expected = model(xb)
            assert relative_error(program.module()(xb), expected) < TOL
            assert relative_error(portable.module()(xb), expected) < TOL


def test_export_never_traces_the_cuda_kernels(monkeypatch):
    """On CUDA the LayerNorms would run as Triton custom ops; exported programs must hold aten's
    layer norm instead (forced here on the CPU)."""
    import vmamba.ops.layer_norm as layer_norm

    monkeypatch.setattr(layer_norm, "_FORCE_TRITON", True)
    model = vmamba.create_model("vmamba_tiny_s1l8", num_classes=5, **TINY).eval()
    program = export_program(model, torch.randn(2, 3, 32, 32))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("vmamba" in t for t in targets), sorted(t for t in targets if "vmamba" in t)
    assert any("layer_norm" in t for t in targets)


def test_torch_export_backbone_and_saved_program(tmp_path):
    model = vmamba.create_model("vmamba_tiny_m2", features_only=True, out_indices=(0, 1), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    program = export_program(model, x)
    path = tmp_path / "backbone.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        xb = torch.randn(3, 3, 32, 32)
        for a, b in zip(loaded(xb), model(xb)):
            assert relative_error(a, b) < TOL


def test_cli_torch_export(tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["export", "--model", "vmamba_tiny_s1l8", "--format", "torch-export", "--img-size", "32",
                 "--set", "dims=(8,16)", "--set", "depths=(1,1)", "--num-classes", "4", str(out)]) == 0
    assert "matches eager: True" in capsys.readouterr().out
    program = torch.export.load(str(out))
    assert not has_custom_scan(program)
    assert program.module()(torch.randn(5, 3, 32, 32)).shape == (5, 4)
    # The decomposed program runs in a process that never imports vmamba.
    script = (f"import sys, torch; p = torch.export.load({str(out)!r}); "
              "y = p.module()(torch.randn(3, 3, 32, 32)); "
              "assert y.shape == (3, 4) and 'vmamba' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def _real_images(size: int, batch: int) -> torch.Tensor:
    """Crops of scikit-learn's bundled photographs, normalised with the models' mean/std."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from vmamba.pretrained import IMAGENET_MEAN, IMAGENET_STD

    images = []
    for i in range(batch):
        photo = sklearn_datasets.load_sample_image(("china.jpg", "flower.jpg")[i % 2])
        t = torch.from_numpy(photo.copy()).permute(2, 0, 1).float().div(255)[None]
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
        images.append(t[0])
    x = torch.stack(images)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    directory = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = vmamba.create_model("vmamba_tiny_s1l8", num_classes=10, **TINY).eval()
    checkpoint = directory / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    out = directory / "tiny.onnx"
    code = main(["export", "--model", "vmamba_tiny_s1l8", "--checkpoint", str(checkpoint), "--format", "onnx",
                 "--img-size", "64", "--set", "dims=(8,16)", "--set", "depths=(1,1)", str(out)])
    assert code == 0
    return out, model


def test_onnx_dynamic_batch_matches_pytorch(onnx_file):
    import onnx

    from vmamba.tools.export import onnx_outputs

    path, model = onnx_file
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ops only
    for images in (torch.randn(1, 3, 64, 64), torch.randn(4, 3, 64, 64), _real_images(64, 2),
                   _real_images(64, 3)):
        (actual,) = onnx_outputs(path, images)
        with torch.no_grad():
            expected = model(images)
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) < TOL

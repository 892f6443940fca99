"""Exporting models: ``torch.export`` programs and ONNX files with a dynamic batch dimension.

The selective scan is a custom op (with GPU kernels) that other runtimes do not know; exported
programs are rewritten to the pure-tensor scan of :mod:`vmamba.ops.export` (unless asked to keep the
op), so they run anywhere. Tracing always uses the torch backend's custom op and aten's LayerNorm,
whatever the device (the fused CUDA core and the Triton LayerNorm are never traced).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import use_backend
from ..ops.export import decompose_scans
from ..ops.layer_norm import use_triton_layer_norm

MAX_BATCH = 4096


def _example(model: nn.Module, batch: int, img_size: int | Sequence[int]) -> Tensor:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, "in_chans", 3)
    param = next(model.parameters())
    return torch.randn(batch, in_chans, *size, dtype=param.dtype, device=param.device)


def export_program(model: nn.Module, example: Tensor, dynamic_batch: bool = True,
                   decompose: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (put in eval mode) on ``example`` (B, C, H, W).

    ``dynamic_batch`` makes dim 0 symbolic; ``decompose`` replaces the scan custom op by tensor ops.
    """
    model.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    # the torch scan backend also keeps SS2D off the fused CUDA core; LayerNorm stays aten's
    with use_backend("torch"), use_triton_layer_norm(False), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    return decompose_scans(program) if decompose else program


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int | Sequence[int] = 224,
                example: Tensor | None = None, dynamic_batch: bool = True, opset: int | None = None,
                optimize: bool = True) -> Path:
    """Write ``model`` as ONNX (input ``images``, outputs ``logits`` or ``features{i}``); returns the path."""
    import onnx  # noqa: F401  (a clear ImportError before the long trace)

    path = Path(path)
    example = _example(model, 2, img_size) if example is None else example
    program = export_program(model, example, dynamic_batch=dynamic_batch, decompose=True)
    with torch.no_grad():
        sample = program.module()(example)
    outputs = [f"features{i}" for i in range(len(sample))] if isinstance(sample, (list, tuple)) else ["logits"]
    kwargs: dict[str, Any] = dict(dynamo=True, optimize=optimize, input_names=["images"], output_names=outputs)
    if opset is not None:
        kwargs["opset_version"] = opset
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(program, (example,), **kwargs)
    onnx_program.save(str(path))
    if dynamic_batch:
        _name_batch_dim(path)
    return path


def _name_batch_dim(path: Path) -> None:
    """Rename the exporter's symbol of the batch dimension (e.g. ``s77``) to ``batch`` throughout."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    first = graph.input[0].type.tensor_type.shape.dim
    symbol = first[0].dim_param if first else ""
    if not symbol:
        return
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
    onnx.save(proto, str(path))


def onnx_outputs(path: str | os.PathLike, images: Tensor) -> list[Tensor]:
    """Run an exported ONNX file with onnxruntime (CPU) on ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [torch.from_numpy(o) for o in session.run(None, {name: images.detach().cpu().numpy()})]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def verify_onnx(model: nn.Module, path: str | os.PathLike, batches: Sequence[Tensor]) -> list[float]:
    """Relative error of onnxruntime against the PyTorch model on each batch (worst output)."""
    errors = []
    model.eval()
    for images in batches:
        with torch.no_grad():
            expected = model(images)
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        actual = onnx_outputs(path, images)
        errors.append(max(relative_error(a, e) for a, e in zip(actual, expected)))
    return errors


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


__all__ = ["export_onnx", "export_program", "onnx_outputs", "relative_error", "save_program", "verify_onnx"]

"""Inference replayed from a CUDA graph (``vmamba.cuda_graph``): clear errors anywhere; on a GPU
(VMAMBA_TEST_CUDA=1) the replay matches the eager forward for fresh inputs."""

from __future__ import annotations

import os

import pytest
import torch

import vmamba
from vmamba.analysis.bench import BenchSettings
from vmamba.cuda_graph import graph_for_inference

GPU = os.environ.get("VMAMBA_TEST_CUDA", "0") == "1" and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs VMAMBA_TEST_CUDA=1 and a CUDA device")


def _small_model(**kwargs):
    return vmamba.create_model("vmamba_tiny_s1l8", dims=16, depths=[1, 1, 2, 1], num_classes=10, **kwargs)


def test_cpu_input_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA input"):
        graph_for_inference(_small_model(), torch.randn(2, 3, 32, 32))


def test_bench_settings_refuse_cuda_graph_with_compile():
    with pytest.raises(ValueError, match="cannot be combined with compile"):
        BenchSettings(cuda_graph=True, compile=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_settings_refuse_cuda_graph_without_cuda():
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        BenchSettings(cuda_graph=True).resolved_device()
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        BenchSettings(cuda_graph=True, device="cpu").resolved_device()


def test_accumulate_grad_stream_warning_switch_reaches_pytorch(monkeypatch):
    """The switch that graph captures turn off must reach PyTorch's setter (torch >= 2.9), by its name."""
    from vmamba.train.engine import warn_on_accumulate_grad_stream_mismatch

    calls = []
    monkeypatch.setattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", calls.append,
                        raising=False)
    warn_on_accumulate_grad_stream_mismatch(False)
    assert calls == [False]


@needs_gpu
def test_model_on_cpu_is_refused():
    with pytest.raises(ValueError, match="not on cuda"):
        graph_for_inference(_small_model(), torch.randn(2, 3, 32, 32, device="cuda"))


@needs_gpu
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_replay_matches_eager(amp_dtype):
    torch.manual_seed(0)
    model = _small_model().cuda().to(memory_format=torch.channels_last)
    shape = (4, 3, 64, 64)
    example = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    graphed = graph_for_inference(model, example, amp_dtype)
    for seed in (1, 2):  # fresh inputs: the replay reads the copied input, not the example
        x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            expected = model(x).float()
        got = graphed(x).float()
        tol = 1e-4 if amp_dtype is None else 2e-2  # bf16: one rounding step of logits of order 1
        assert torch.allclose(got, expected, rtol=tol, atol=tol), (got - expected).abs().max()
    first = graphed(x)
    graphed(torch.zeros_like(x))
    assert torch.equal(first, graphed(x)), "outputs are cloned by default: a later call must not change them"
    with pytest.raises(ValueError, match="captured for"):
        graphed(torch.randn(2, 3, 64, 64, device="cuda"))


@needs_gpu
def test_bench_cuda_graph_rows():
    from vmamba.analysis.bench import bench_models

    settings = BenchSettings(batch_size=2, dtype="bf16", cuda_graph=True, warmup=1, iters=2, device="cuda",
                             with_flops=False)
    rows = bench_models(["vmamba_tiny_s1l8"], [(64, 64)], settings, overrides={"dims": 16, "depths": [1, 1, 2, 1]},
                        log=None)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["img_per_s"] > 0 for r in rows)

"""bench: well-formed rows, table, JSON and PNG at tiny sizes on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from vmamba.analysis.bench import BenchSettings, bench_models, run_one, tf32_enabled
from vmamba.cli import main

TINY = ["--opt", "dims=8", "--opt", "depths=(1,1,1,1)"]


def test_bench_command_table_json_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "vmamba_tiny_s1l8", "resnet18", "--img-size", "32", "48", "--batch-size", "2", "--warmup",
               "0", "--iters", "1", "--device", "cpu", "--json", str(js), "--plot", str(png), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "img_per_s" in out and "resnet18" in out and "vmamba_tiny_s1l8" in out
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2  # models x sizes x modes
    for row in rows:
        assert row["status"] == "ok" and row["img_per_s"] > 0 and row["ms_per_iter"] > 0
        assert row["peak_rss_mb"] > 0 and row["params_M"] > 0 and row["GFLOPs"] > 0
    assert {(r["model"], r["size"], r["mode"]) for r in rows} >= {("resnet18", "48x48", "train")}
    assert data["environment"]["device"] == "cpu" and data["environment"]["batch_size"] == 2
    assert png.stat().st_size > 1000


def test_bench_options_bf16_channels_last_compile():
    from vmamba import create_model

    model = create_model("vmamba_tiny_s1l8", dims=8, depths=(1, 1, 1, 1), num_classes=5)
    settings = BenchSettings(batch_size=2, dtype="bf16", channels_last=True, compile=True, compile_backend="eager",
                             warmup=1, iters=1, device="cpu")
    weights = [p.detach().clone() for p in model.parameters()]
    row = run_one(model, (32, 32), "infer", settings)
    # compiling must not turn the inference run into a training one
    assert row["img_per_s"] > 0 and not model.training
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    row = run_one(model, (32, 32), "train", settings)
    assert row["img_per_s"] > 0 and model.training


def test_bench_errors_and_flags():
    with pytest.raises(ValueError):
        BenchSettings(dtype="fp8")
    with pytest.raises(ValueError):
        BenchSettings(modes=("fly",))
    with pytest.raises(ValueError, match="compile mode"):
        BenchSettings(compile_mode="fastest")
    previous = torch.backends.cuda.matmul.allow_tf32
    with tf32_enabled(not previous):
        assert torch.backends.cuda.matmul.allow_tf32 is (not previous)
    assert torch.backends.cuda.matmul.allow_tf32 is previous
    rows = bench_models(["not_a_model_anywhere"], [(32, 32)], BenchSettings(batch_size=1, iters=1, warmup=0,
                                                                              device="cpu"), log=None)
    assert rows[0]["status"].startswith("build failed")


def test_bench_cuda_graph_flag_errors(capsys):
    from vmamba.cli import main

    assert main(["bench", "vmamba_tiny_s1l8", "--cuda-graph", "--device", "cpu", "--no-flops"]) == 2
    assert "cuda_graph needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "vmamba_tiny_s1l8", "--cuda-graph", "--compile", "--no-flops"]) == 2
    assert "cannot be combined with compile" in capsys.readouterr().err


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    import sys

    from vmamba.analysis.bench import plot_throughput

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [{"model": "m", "size": "32x32", "mode": "infer", "img_per_s": 1.0, "status": "ok"}]
    with pytest.raises(ValueError, match="pip install"):
        plot_throughput(rows, "unused.png")

"""``vmamba train --cuda-graph`` on a GPU: replaying the captured forward and backward trains the same
weights as the eager step (runs with VMAMBA_TEST_CUDA=1 on a CUDA machine; skipped elsewhere)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

if os.environ.get("VMAMBA_TEST_CUDA", "0") != "1" or not torch.cuda.is_available():
    pytest.skip("needs VMAMBA_TEST_CUDA=1 and a CUDA device", allow_module_level=True)

# no augmentation, mixup or drop-path: the capture's warm-up draws from the RNG, nothing else differs
ARGS = ["train", "--device", "cuda", "--amp", "bf16", "--channels-last", "--img-size", "32", "--model-arg", "dims=16",
        "--model-arg", "depths=[1,1,2,1]", "--batch-size", "32", "--epochs", "2", "--max-steps-per-epoch", "4",
        "--warmup-epochs", "1", "--no-aug", "--drop-path", "0", "--log-interval", "2", "--no-model-ema"]


def _initial_weights(argv):
    from vmamba.cli import build_parser
    from vmamba.train.config import build_config, flags_to_values
    from vmamba.train.engine import build_model, seed_everything

    cfg = build_config(flag_values=flags_to_values(build_parser().parse_args(argv)))
    seed_everything(cfg.seed)  # as train() does before building the model
    return build_model(cfg.model, 10, cfg.model_args, cfg.drop_path).state_dict()


def test_cuda_graph_training_matches_eager(tmp_path):
    from vmamba.cli import main

    assert main([*ARGS, "--no-cuda-graph", "--output", str(tmp_path / "eager")]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*ARGS, "--cuda-graph", "--output", str(tmp_path / "graph")]) == 0
    stream_warnings = [str(w.message) for w in caught if "AccumulateGrad" in str(w.message)]
    assert not stream_warnings, stream_warnings[0]
    eager, graph = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("eager", "graph"))
    initial = _initial_weights(ARGS)
    assert eager.keys() == graph.keys()
    moved = sum((eager[k].float() - initial[k].float()).square().sum() for k in eager).sqrt()
    apart = sum((eager[k].float() - graph[k].float()).square().sum() for k in eager).sqrt()
    assert moved > 0 and apart <= 0.05 * moved, (apart, moved)
    metrics = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("eager", "graph")]
    assert len(metrics[0]) == len(metrics[1]) == 2
    for a, b in zip(*metrics):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-2


def test_replays_draw_fresh_drop_path_masks():
    """Graph-safe RNG: each replay of the captured forward draws new stochastic-depth masks."""
    import vmamba
    from vmamba.train.engine import graph_for_training

    model = vmamba.create_model("vmamba_tiny_s1l8", dims=16, depths=[1, 1, 2, 1], num_classes=10,
                                drop_path_rate=0.5).cuda()
    graphed = graph_for_training(model, (4, 3, 32, 32), torch.bfloat16, channels_last=False)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        first, second = graphed(x).float(), graphed(x).float()
    assert not torch.equal(first, second)
    graphed.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(graphed(x), graphed(x))  # eval: eager, no drop-path


def test_capture_leaves_batchnorm_statistics_untouched():
    """The capture's warm-up runs on random inputs; the running statistics must not remember them."""
    from torch import nn

    from vmamba.train.engine import graph_for_training

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(10)).cuda()
    model(torch.randn(2, 3, 8, 8, device="cuda"))  # materialise the lazy layer
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    graphed = graph_for_training(model, (4, 3, 8, 8), None, channels_last=False)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    graphed(torch.randn(4, 3, 8, 8, device="cuda"))  # a replay does update them, as a training step should
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])

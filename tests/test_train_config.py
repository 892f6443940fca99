"""Recipe config (YAML + flags), LR scaling, parameter groups, checkpoints loadable with weights_only."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vmamba
from vmamba.cli import build_parser
from vmamba.train.checkpointing import atomic_torch_save, capture_rng_state, restore_rng_state
from vmamba.train.config import DIGITS_PRESET, TrainConfig, build_config, flags_to_values, load_yaml, scaled_lrs
from vmamba.train.engine import ShardSampler, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_default_is_the_digits_preset():
    cfg = build_config()
    assert cfg.data == "digits" and cfg.img_size == 32 and cfg.mixup == 0
    assert cfg.model_args == {"dims": 32, "depths": [1, 1, 2, 1]}
    assert build_config(load_yaml(CONFIGS / "digits.yaml")) == cfg


def test_folder_data_uses_the_published_recipe():
    cfg = build_config(flag_values={"data": "/data/imagenet"})
    assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay, cfg.clip_grad) == (300, 20, 0.05, 5.0)
    assert (cfg.smoothing, cfg.mixup, cfg.cutmix, cfg.aa, cfg.reprob) == (0.1, 0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25)
    assert (cfg.interpolation, cfg.crop_pct, cfg.img_size, cfg.model_ema) == ("bicubic", 0.875, 224, True)
    assert cfg.model_args == {} and cfg.drop_path is None  # the model's own drop-path rate
    # 5e-4 per 512 images, linear in the global batch (8 GPUs x 128 = 1024 -> 1e-3)
    peak, warm, low = scaled_lrs(cfg, 1024)
    assert peak == pytest.approx(1e-3) and warm == pytest.approx(1e-6) and low == pytest.approx(1e-5)
    assert scaled_lrs(cfg, 256)[0] == pytest.approx(2.5e-4)


@pytest.mark.parametrize("name", vmamba.list_models())
def test_recipe_files_for_every_model(name):
    cfg = build_config(load_yaml(CONFIGS / "imagenet1k" / f"{name}.yaml"))
    assert cfg.model == name and cfg.epochs == 300 and cfg.base_lr == 5e-4 and cfg.base_batch == 512
    assert cfg.drop_path == vmamba.get_config(name).drop_path_rate


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": "/x", "epochs": 50, "batch_size": 64, "model_args": {"d_state": 2}}))
    args = parse("--config", str(path), "--epochs", "7", "--no-model-ema", "--scale", "0.3", "1",
                 "--model-arg", "dims=48", "--clip-grad", "none")
    cfg = build_config(load_yaml(args.config), flags_to_values(args))
    assert (cfg.epochs, cfg.batch_size, cfg.model_ema, cfg.scale, cfg.clip_grad) == (7, 64, False, (0.3, 1.0), None)
    assert cfg.model_args == {"d_state": 2, "dims": 48}
    assert cfg.warmup_epochs == 20  # untouched recipe value


def test_naming_another_model_drops_the_preset_architecture():
    cfg = build_config(flag_values={"model": "vmamba_tiny_s2l5"})
    assert cfg.model_args == {} and cfg.img_size == DIGITS_PRESET["img_size"]


def test_print_config(capsys):
    from vmamba.cli import main

    assert main(["train", "--print-config", "--epochs", "3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 3 and printed["data"] == "digits"
    assert set(printed) == set(TrainConfig().to_dict())


def test_parameter_groups_follow_the_published_rule():
    from timm.optim import create_optimizer_v2

    model = build_model("vmamba_tiny_s1l8", 10, {"dims": 16, "depths": [1, 1, 1, 1]})
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=True)
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {ids[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(decay) == {0.0, 0.05}
    assert any(n.endswith("A_logs") for n in decay[0.05])  # A_logs (2-D) is decayed, as published
    assert any(n.endswith("Ds") for n in decay[0.0])  # Ds is 1-D: no decay
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim <= 1 for n in decay[0.0])
    assert all(model.get_parameter(n).ndim > 1 and not n.endswith(".bias") for n in decay[0.05])
    assert isinstance(opt, torch.optim.AdamW)


def test_checkpoint_loads_with_weights_only_and_restores_rng(tmp_path):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    model = build_model("vmamba_tiny_s1l8", 3, {"dims": 16, "depths": [1, 1, 1, 1]})
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=1e-6, t_in_epochs=False)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched.step_update(1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    atomic_torch_save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [state],
                       "scaler": scaler.state_dict(), "model": model.state_dict(), "epoch": 1}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    restore_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    opt2 = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"epoch": 2, "bad": Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_shard_sampler_splits_global_batches_across_ranks():
    single = list(ShardSampler(103, 1, 0, seed=5, shuffle=True, global_batch=8))
    r0 = list(ShardSampler(103, 2, 0, seed=5, shuffle=True, global_batch=8))
    r1 = list(ShardSampler(103, 2, 1, seed=5, shuffle=True, global_batch=8))
    assert len(single) == 96 and len(r0) == len(r1) == 48
    for k in range(12):  # the k-th global batch holds the same images
        assert sorted(single[8 * k:8 * k + 8]) == sorted(r0[4 * k:4 * k + 4] + r1[4 * k:4 * k + 4])
    s = ShardSampler(103, 1, 0, seed=5, shuffle=True, global_batch=None)
    s.set_epoch(1)
    assert list(s) != single and sorted(s) == list(range(103))


def test_compile_mode_is_checked_and_reaches_torch_compile(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose one of"):
        build_config(flag_values={"compile": True, "compile_mode": "fast"})
    with pytest.raises(ValueError, match="needs --compile"):
        build_config(flag_values={"compile_mode": "reduce-overhead"})
    args = parse("--compile", "--compile-mode", "reduce-overhead")
    assert build_config(flag_values=flags_to_values(args)).compile_mode == "reduce-overhead"

    from vmamba.cli import main

    modes = []

    def recording_compile(model, backend=None, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "--compile", "--compile-mode", "max-autotune-no-cudagraphs", "--epochs", "1",
                   "--max-steps-per-epoch", "1", "--threads", "1", "--no-model-ema", "--output", str(tmp_path / "o")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and modes == ["max-autotune-no-cudagraphs"]


def test_cuda_graph_flag_is_checked(tmp_path, capsys):
    for clash, message in (({"compile": True}, "--compile"), ({"grad_checkpointing": True}, "--grad-checkpointing"),
                           ({"device": "cpu"}, "--device cpu"), ({"accum_steps": 2}, "--accum-steps > 1")):
        with pytest.raises(ValueError, match=f"cuda-graph cannot be combined with {message}"):
            build_config(flag_values={"cuda_graph": True, **clash})
    assert build_config(flag_values=flags_to_values(parse("--cuda-graph"))).cuda_graph
    if torch.cuda.is_available():
        return
    from vmamba.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(["train", "--cuda-graph", "--epochs", "1", "--max-steps-per-epoch", "1", "--threads", "1",
                   "--output", str(tmp_path / "o")])
    finally:
        torch.set_num_threads(threads)
    assert rc != 0 and "cuda-graph needs one CUDA process (found cpu)" in capsys.readouterr().err


def test_cuda_graph_default_applies_to_one_cuda_process_only():
    from vmamba.train.engine import use_cuda_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert build_config().cuda_graph is None  # auto
    assert build_config(flag_values=flags_to_values(parse("--no-cuda-graph"))).cuda_graph is False
    assert use_cuda_graph(None, cuda, distributed=False, compiled=False, grad_checkpointing=False)
    for device, distributed, compiled, checkpointing in ((cpu, False, False, False), (cuda, True, False, False),
                                                         (cuda, False, True, False), (cuda, False, False, True)):
        assert not use_cuda_graph(None, device, distributed, compiled, checkpointing)
    assert not use_cuda_graph(None, cuda, distributed=False, compiled=False, grad_checkpointing=False,
                              accumulating=True)
    assert not use_cuda_graph(False, cuda, distributed=False, compiled=False, grad_checkpointing=False)
    with pytest.raises(ValueError, match="several processes"):
        use_cuda_graph(True, cuda, distributed=True, compiled=False, grad_checkpointing=False)


def test_none_is_a_value_for_options_that_cannot_be_empty():
    assert build_config(flag_values=flags_to_values(parse("--amp", "none"))).amp == "none"
    assert build_config(flag_values=flags_to_values(parse("--aa", "none"))).aa is None

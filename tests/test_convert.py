"""``vmamba convert`` and the restricted unpickler, on checkpoints built here like the published ones."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vmamba
from vmamba.cli import main
from vmamba.tools.convert import convert_checkpoint
from vmamba.tools.safe_pickle import Stub, UnsafeCheckpointError, read_checkpoint

TINY = dict(dims=8, depths=(1, 1, 1, 1))

# Published vanilla checkpoints use the old names (the reverse of vmamba.models.checkpoint's renames).
OLD_NAMES = (
    (re.compile(r"^patch_embed\.0\."), "patch_embed.proj."),
    (re.compile(r"^patch_embed\.2\."), "patch_embed.norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.norm\."), r"\1.ln_1."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.op\."), r"\1.self_attention."),
    (re.compile(r"^classifier\.norm\."), "norm."),
    (re.compile(r"^classifier\.head\."), "head."),
)


def fake_yacs_module() -> types.ModuleType:
    """A stand-in for ``yacs`` whose CfgNode pickles as ``yacs.config.CfgNode`` (like the published files)."""
    yacs = types.ModuleType("yacs")
    config = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    config.CfgNode = CfgNode
    yacs.config = config
    return yacs


@pytest.fixture
def yacs(monkeypatch):
    module = fake_yacs_module()
    monkeypatch.setitem(sys.modules, "yacs", module)
    monkeypatch.setitem(sys.modules, "yacs.config", module.config)
    return module


def to_old_names(state_dict):
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in OLD_NAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def published_checkpoint(path: Path, state_dict, old_keys: bool = False, extra: dict | None = None,
                         ema: dict | None = None) -> Path:
    """A training checkpoint like the published ones: model, model_ema, optimizer, a yacs config, ..."""
    CfgNode = sys.modules["yacs.config"].CfgNode
    model = to_old_names(state_dict) if old_keys else dict(state_dict)
    ema = to_old_names(ema) if ema is not None and old_keys else ema
    config = CfgNode(MODEL=CfgNode(NAME="vssm", TYPE="vssm"), TRAIN=CfgNode(EPOCHS=300))
    checkpoint = {
        "model": model,
        "model_ema": ema if ema is not None else {k: v.clone() for k, v in model.items()},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
        "lr_scheduler": {"last_epoch": 3},
        "max_accuracy": 82.6,
        "epoch": 263,
        "config": config,
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


class RunsCommand:
    """Pickles as a call of ``fn(*args)``: unpickling it with pickle/torch.load runs the command."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_published_style_file_is_refused_by_weights_only_and_converted(tmp_path, yacs):
    source = vmamba.create_model("vmamba_tiny_s1l8", **TINY)
    path = published_checkpoint(tmp_path / "vssm1_tiny.pth", source.state_dict())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    obj, stubbed = read_checkpoint(path)
    assert stubbed == {"yacs.config.CfgNode"}
    assert isinstance(obj["config"], Stub) and obj["config"]["MODEL"]["NAME"] == "vssm"
    assert obj["epoch"] == 263 and obj["max_accuracy"] == 82.6
    out = tmp_path / "out.safetensors"
    report = convert_checkpoint(path, out, model_name="vmamba_tiny_s1l8", overrides=TINY)
    assert report.model == "vmamba_tiny_s1l8" and report.weights == "model" and report.num_classes == 1000
    assert report.ignored_objects == ["yacs.config.CfgNode"]
    converted = load_file(str(out))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(converted[key], value)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["vmamba_model"] == "vmamba_tiny_s1l8"
    model = vmamba.create_model("vmamba_tiny_s1l8", checkpoint_path=out, **TINY)  # strict load
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), source.eval()(x))


def test_old_key_names_and_ema(tmp_path, yacs):
    source = vmamba.create_model("vanilla_vmamba_tiny", num_classes=10, **TINY)
    state = source.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = published_checkpoint(tmp_path / "old.pth", state, old_keys=True, ema=ema)
    checkpoint_obj, _ = read_checkpoint(path)
    assert "head.weight" in checkpoint_obj["model"] and "patch_embed.proj.weight" in checkpoint_obj["model"]
    assert any(".ln_1." in k for k in checkpoint_obj["model"])
    out = tmp_path / "ema.safetensors"
    report = convert_checkpoint(path, out, model_name="vanilla_vmamba_tiny", use_ema=True, overrides=TINY)
    assert report.weights == "model_ema" and report.num_classes == 10
    converted = load_file(str(out))
    torch.testing.assert_close(converted["classifier.head.bias"], ema["classifier.head.bias"])


@pytest.mark.parametrize("payload", ["os.system", "subprocess", "exec", "eval-in-config"])
def test_malicious_pickle_does_not_run(tmp_path, yacs, payload):
    marker = tmp_path / "PWNED"
    command = f"touch {marker}"
    if payload == "os.system":
        evil = RunsCommand(os.system, command)
    elif payload == "subprocess":
        evil = RunsCommand(subprocess.call, ["touch", str(marker)])
    elif payload == "exec":
        evil = RunsCommand(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    else:
        CfgNode = sys.modules["yacs.config"].CfgNode
        evil = CfgNode(HOOK=RunsCommand(builtins.eval, f"__import__('os').system({command!r})"))
    source = vmamba.create_model("vmamba_tiny_s1l8", **TINY)
    path = published_checkpoint(tmp_path / "evil.pth", source.state_dict(), extra={"config": evil})
    # Sanity: the file really is armed (plain unpickling would run the command) -- not executed here.
    obj, stubbed = read_checkpoint(path)
    assert not marker.exists()
    assert any(name.endswith((".system", ".call", ".exec", ".eval")) for name in stubbed), stubbed
    # through the CLI too (the full-size model does not match this small file: exit status 2)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", "vmamba_tiny_s1l8"]) == 2
    report = convert_checkpoint(path, tmp_path / "out.safetensors", model_name="vmamba_tiny_s1l8", overrides=TINY)
    assert report.tensors == len(source.state_dict())
    assert not marker.exists()


def test_armed_file_names_a_command_runner(tmp_path):
    """Control for the test above: the same construction puts os.system into the pickle (read by
    disassembling the opcodes, never by unpickling)."""
    path = tmp_path / "armed.pth"
    torch.save({"x": RunsCommand(os.system, "true")}, path)
    with zipfile.ZipFile(path) as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        globals_ = {arg for op, arg, _ in pickletools.genops(archive.read(pickle_name)) if op.name == "GLOBAL"}
    assert globals_ & {"os system", "posix system", "nt system"}


def test_bad_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy"):
        read_checkpoint(legacy)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(garbage)
    # truncated storage record
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(4, 4)}}, good)
    import zipfile

    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data[:8] if "/data/" in info.filename else data)
    with pytest.raises(UnsafeCheckpointError, match="bytes"):
        read_checkpoint(bad)


def test_tensor_dtypes_views_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"f32": base, "view": base[1:, ::2], "t": base.t(), "bf16": torch.randn(3, dtype=torch.bfloat16),
               "i64": torch.arange(5), "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5),
               "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.ones(2))}
    tagged = torch.arange(3.0)
    tagged.note = "python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
    tensors["tagged"] = tagged
    path = tmp_path / "mixed.pth"
    torch.save({"state_dict": tensors}, path)
    obj, stubbed = read_checkpoint(path)
    assert not stubbed
    for key, value in tensors.items():
        assert obj["state_dict"][key].dtype == value.dtype
        torch.testing.assert_close(obj["state_dict"][key], value.detach())


def test_cli_convert_detects_full_size_model(tmp_path, yacs, capsys):
    """A full-size vanilla checkpoint with the published key names: the model is detected."""
    source = vmamba.create_model("vanilla_vmamba_tiny")
    path = published_checkpoint(tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth", source.state_dict(), old_keys=True)
    out = tmp_path / "vanilla_tiny.safetensors"
    assert main(["convert", str(path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vanilla_vmamba_tiny" in printed and "yacs.config.CfgNode" in printed
    model = vmamba.create_model("vanilla_vmamba_tiny", checkpoint_path=out)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_cli_convert_reports_mismatch(tmp_path, yacs, capsys):
    source = vmamba.create_model("vmamba_tiny_s1l8", **TINY)
    path = published_checkpoint(tmp_path / "x.pth", source.state_dict())
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "--model", "vmamba_tiny_s1l8"]) == 2
    assert "does not match vmamba_tiny_s1l8" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "--ema"]) == 2  # no registered match


def test_segmentation_checkpoint_becomes_backbone_weights(tmp_path, yacs):
    """mmseg / mmdet checkpoints: 'backbone.*' weights (with outnorm{i}) → VSSMBackbone safetensors."""
    backbone = vmamba.create_model("vmamba_tiny_s1l8", features_only=True, **TINY)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    path = tmp_path / "upernet.pth"
    torch.save({"state_dict": state, "meta": {"cfg": sys.modules["yacs.config"].CfgNode(model="x")}}, path)
    out = tmp_path / "backbone.safetensors"
    report = convert_checkpoint(path, out, model_name="vmamba_tiny_s1l8", overrides=TINY)
    assert report.features_only and report.out_indices == (0, 1, 2, 3)
    loaded = vmamba.create_model("vmamba_tiny_s1l8", features_only=True, checkpoint_path=out, **TINY)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)

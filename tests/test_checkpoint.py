"""Loading checkpoints: formats, wrappers, published key names, clear errors, no unpickling."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vmamba import CheckpointError, create_model, load_checkpoint
from vmamba.compat import build_official, parse_forward_type
from vmamba.layers import GateMode, OutNormKind, SSMCore
from vmamba.ops import ScanMode


def tiny(**overrides):
    return create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=4, **overrides)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_and_weights_only_files(tmp_path):
    source, target = tiny(), tiny()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    load_checkpoint(target, tmp_path / "w.safetensors")
    assert same_weights(source, target)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    other = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=4,
                         checkpoint_path=tmp_path / "ckpt.pth")
    assert same_weights(source, other)


def test_ema_and_state_dict_wrappers(tmp_path):
    plain, ema = tiny(), tiny()
    torch.save({"model": plain.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "c.pth")
    target = tiny()
    load_checkpoint(target, tmp_path / "c.pth", use_ema=True)
    assert same_weights(ema, target)
    load_checkpoint(target, {"state_dict": {"module." + k: v for k, v in plain.state_dict().items()}})
    assert same_weights(plain, target)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_checkpoint(target, {"model": plain.state_dict()}, use_ema=True)


def test_published_old_key_names_and_conv_shaped_linears():
    source = create_model("vanilla_vmamba_tiny", dims=16, depths=(1, 1, 1, 1), num_classes=4)
    old = {}
    for key, value in source.state_dict().items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".op.", ".self_attention.").replace("blocks.0.norm.", "blocks.0.ln_1.")
        key = key.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        old[key] = value
    assert "head.weight" in old and "layers.0.blocks.0.self_attention.A_logs" in old
    target = create_model("vanilla_vmamba_tiny", dims=16, depths=(1, 1, 1, 1), num_classes=4)
    target.load_state_dict(old)  # plain load_state_dict applies the renames too
    assert same_weights(source, target)
    channel_first = tiny()
    state = {k: (v[:, :, None, None] if k.endswith("in_proj.weight") else v)
             for k, v in channel_first.state_dict().items()}
    target = tiny()
    load_checkpoint(target, state)
    assert same_weights(channel_first, target)


def test_mismatched_checkpoint_lists_keys():
    model = tiny()
    state = model.state_dict()
    state.pop("classifier.head.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: classifier\.head\.weight.*unexpected keys: extra"):
        load_checkpoint(model, state)
    wrong = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=9).state_dict()
    with pytest.raises(CheckpointError, match=r"classifier\.head\.weight \(9, 128\) vs model \(4, 128\)"):
        load_checkpoint(model, wrong)


class _Config:  # stands in for a pickled configuration object of another library
    pass


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": tiny().state_dict(), "config": _Config()}, tmp_path / "cfg.pth")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint.*vmamba convert"):
        load_checkpoint(tiny(), tmp_path / "cfg.pth")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tiny(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(tiny(), tmp_path / "junk.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(tiny(), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")


def test_pos_embed_is_resized():
    source = tiny(posembed=True, img_size=64)
    target = tiny(posembed=True, img_size=32)
    target.load_state_dict(source.state_dict())
    assert target.pos_embed.shape == (1, 16, 8, 8)


def test_forward_type_parsing():
    assert parse_forward_type("v05_noz").gate is GateMode.NONE
    assert parse_forward_type("v05").gate is GateMode.ACTIVATED
    assert parse_forward_type("v05_nozact").gate is GateMode.LINEAR
    assert parse_forward_type("m0_noz").core is SSMCore.M0
    assert parse_forward_type("v05_noz_onsigmoid").out_norm is OutNormKind.SIGMOID
    assert parse_forward_type("v05_oact_noz").out_act
    assert parse_forward_type("v052d_noz").scan_mode is ScanMode.CASCADE2D
    assert parse_forward_type("v0").core is SSMCore.V0
    assert parse_forward_type("v05_noz_no32") == parse_forward_type("v05_noz")
    with pytest.raises(ValueError, match="'v99_noz'.*'v99'"):
        parse_forward_type("v99_noz")


def test_build_official_rejects_unknown_values():
    with pytest.raises(ValueError, match="warp"):
        build_official("VSSM", {"warp": 1})
    with pytest.raises(ValueError, match="norm_layer='gn'"):
        build_official("VSSM", {"norm_layer": "gn"})
    with pytest.raises(ValueError, match="v0' requires norm_layer='ln'"):
        build_official("VSSM", {"forward_type": "v0", "norm_layer": "ln2d"})
    with pytest.raises(ValueError, match="unknown constructor"):
        build_official("ResNet", {})


@pytest.mark.parametrize("forward_type", ["v05", "v05_noz_onnone", "v05_nozact_ondwconv3", "v05_noz_oncnorm",
                                          "v05_noz_onsoftmax", "m0_noz", "v05_noz_oact", "v052d_noz"])
def test_build_official_forward_types_run(forward_type):
    kwargs = dict(depths=[1, 1, 1, 1], dims=16, ssm_d_state=4, ssm_ratio=1.0, forward_type=forward_type,
                  norm_layer="ln2d", downsample_version="v3", patchembed_version="v2", num_classes=3,
                  ssm_init="v2" if forward_type.startswith("m0") else "v0")
    model = build_official("VSSM", kwargs)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()

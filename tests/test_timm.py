"""timm integration: registration, pretrained cfgs, local weights, features_only, forward_intermediates."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import FeatureListNet

import vmamba
from vmamba.timm_registry import TimmVSSM, VSSMFeatures

TINY = dict(dims=8, depths=(1, 1, 1, 1))
X = (2, 3, 64, 64)


def test_every_model_is_registered_with_pretrained_cfg():
    names = vmamba.list_models()
    assert set(names) <= set(timm.list_models())
    for name in names:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.input_size == (3, 224, 224) and cfg.interpolation == "bicubic" and cfg.crop_pct == 0.875
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        assert cfg.license == "mit" and cfg.paper_ids == "arXiv:2401.10166"
        assert cfg.first_conv == "patch_embed.0" and cfg.classifier == "classifier.head"
    published = vmamba.pretrained.PUBLISHED
    assert set(published) == {n for n in names if not n.endswith("_m2")}
    for name, entry in published.items():
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.url == entry.url and cfg.url.startswith("https://github.com/MzeroMiko/VMamba/releases/download/")
        assert cfg.custom_load  # read by the restricted unpickler, never torch.load
    assert "vmamba_tiny_s1l8.in1k" in timm.list_pretrained("vmamba_tiny*")


def test_create_model_classifier_and_state_dict_keys():
    model = timm.create_model("vmamba_tiny_s1l8", num_classes=7, **TINY)
    assert isinstance(model, TimmVSSM) and isinstance(model, vmamba.VSSM)
    assert model(torch.randn(*X)).shape == (2, 7)
    assert model.pretrained_cfg["architecture"] == "vmamba_tiny_s1l8"
    ours = vmamba.create_model("vmamba_tiny_s1l8", num_classes=7, **TINY)
    assert model.state_dict().keys() == ours.state_dict().keys()
    model.reset_classifier(3)
    assert model(torch.randn(*X)).shape == (2, 3)
    assert timm.create_model("vmamba_tiny_s1l8", num_classes=0, **TINY)(torch.randn(*X)).shape == (2, 64)


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_tiny", "vmamba_tiny_m2"])
def test_features_only_is_a_feature_list_net(name):
    model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), **TINY).eval()
    assert isinstance(model, FeatureListNet) and isinstance(model, VSSMFeatures)
    assert model.feature_info.channels() == [16, 32, 64]
    assert model.feature_info.reduction() == [8, 16, 32]
    assert model.return_layers == {"layers_1": "1", "layers_2": "2", "layers_3": "3"}
    x = torch.randn(*X)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    # Same maps as the classifier's stages before their downsample, always NCHW.
    full = timm.create_model(name, **TINY).eval()
    full.load_state_dict(model_state_for(full, model), strict=False)
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r)


def model_state_for(full, features):
    """Copy the weights of a features_only model back to a classifier (keys differ only by prefix)."""
    out = {}
    for key, value in features.state_dict().items():
        key = key.replace("stem.patch_embed.", "patch_embed.")
        for i in range(4):
            key = key.replace(f"layers_{i}_downsample.module.", f"layers.{i}.downsample.")
            key = key.replace(f"layers_{i}.module.", f"layers.{i}.blocks.")
        out[key] = value
    assert set(out) <= set(full.state_dict())
    return out


def test_hf_timm_backbone_style_return_layers():
    """transformers' TimmBackbone swaps ``return_layers`` (keys = feature_info module names) for hidden states."""
    model = timm.create_model("vmamba_tiny_s1l8", features_only=True, out_indices=(2, 3), **TINY).eval()
    all_layers = {info["module"]: str(i) for i, info in enumerate(model.feature_info.info)}
    chosen = {info["module"]: str(info["index"]) for info in model.feature_info.get_dicts()}
    assert chosen == model.return_layers
    x = torch.randn(*X)
    model.return_layers = all_layers
    hidden = model(x)
    model.return_layers = chosen
    assert len(hidden) == 4 and [h.shape[1] for h in hidden] == [8, 16, 32, 64]
    torch.testing.assert_close(model(x)[0], hidden[2])


def test_getter_features_and_forward_intermediates():
    model = timm.create_model("vanilla_vmamba_tiny", **TINY).eval()
    x = torch.randn(*X)
    final, inter = model.forward_intermediates(x)
    assert [tuple(t.shape) for t in inter] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    torch.testing.assert_close(final, model.forward_features(x))  # NHWC for this channel-last model
    nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
    assert [tuple(t.shape) for t in nhwc] == [(2, 4, 4, 32), (2, 2, 2, 64)]
    normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(normed, model.classifier.norm(final).permute(0, 3, 1, 2))
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], inter[0])

    getter = timm.create_model("vanilla_vmamba_tiny", features_only=True, feature_cls="getter", out_indices=(0, 2),
                               **TINY).eval()
    assert getter.feature_info.channels() == [8, 32]
    assert [tuple(t.shape) for t in getter(x)] == [(2, 8, 16, 16), (2, 32, 4, 4)]
    assert len(getter.model.layers) == 3  # pruned after the last requested stage


def test_prune_intermediate_layers():
    model = timm.create_model("vmamba_tiny_s1l8", **TINY).eval()
    x = torch.randn(*X)
    before = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert model.prune_intermediate_layers((0, 1), prune_norm=True) == [0, 1]
    assert len(model.layers) == 2 and model.num_classes == 0
    after = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)


def test_pretrained_from_local_files(tmp_path):
    source = timm.create_model("vmamba_tiny_s1l8", **TINY).eval()
    x = torch.randn(*X)
    with torch.no_grad():
        expected = source(x)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    loaded = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(st)),
                               **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)

    # weights-only .pth training checkpoint: wrapped, with DDP prefixes
    pth = tmp_path / "weights.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, pth)
    loaded = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(pth)),
                               **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)

    # another head size: the classifier is re-initialised, everything else loaded
    other = timm.create_model("vmamba_tiny_s1l8", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(st)), **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(other.forward_features(x), source.forward_features(x))
    assert other(x).shape == (2, 5)

    # one input channel: the stem is adapted (summed over RGB)
    gray = timm.create_model("vmamba_tiny_s1l8", pretrained=True, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(st)), **TINY)
    torch.testing.assert_close(gray.patch_embed[0].weight, source.patch_embed[0].weight.sum(1, keepdim=True))

    # features_only from a classification checkpoint
    feats = timm.create_model("vmamba_tiny_s1l8", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(st)), **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(feats(x)[3], source.forward_intermediates(x, indices=[3],
                                                                            intermediates_only=True)[0])


def test_pretrained_published_format_uses_restricted_unpickler(tmp_path, monkeypatch):
    """A published-style checkpoint (pickled config object) loads through custom_load, nothing executed."""
    fake_yacs_module, published_checkpoint = _convert_helpers()

    monkeypatch.setitem(__import__("sys").modules, "yacs", fake_yacs_module())
    monkeypatch.setitem(__import__("sys").modules, "yacs.config", __import__("sys").modules["yacs"].config)
    source = timm.create_model("vanilla_vmamba_tiny", **TINY).eval()
    path = published_checkpoint(tmp_path / "pub.pth", source.state_dict(), old_keys=True)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    model = timm.create_model("vanilla_vmamba_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), custom_load=True), **TINY).eval()
    x = torch.randn(*X)
    with torch.no_grad():
        # EMA weights preferred when present (as timm does): the fake EMA is the source + 0
        torch.testing.assert_close(model(x), source(x))


def _convert_helpers():
    """The published-checkpoint builders of test_convert (tests/ is on sys.path, or a package)."""
    try:
        from test_convert import fake_yacs_module, published_checkpoint
    except ImportError:  # tests/ made a package
        from .test_convert import fake_yacs_module, published_checkpoint
    return fake_yacs_module, published_checkpoint


def test_no_download_without_file(monkeypatch):
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(builder, "download_cached_file", refuse)
    with pytest.raises(AssertionError, match="network access"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, **TINY)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vmamba_tiny_m2", pretrained=True, **TINY)


def test_meta_device_construction_for_smp():
    with torch.device("meta"):
        model = timm.create_model("vmamba_tiny_s1l8", features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [96, 192, 384, 768]


def test_timm_kwargs_are_checked():
    with pytest.raises(ValueError, match="output_stride"):
        timm.create_model("vmamba_tiny_s1l8", output_stride=16, **TINY)
    with pytest.raises(ValueError, match="unknown model option"):
        timm.create_model("vmamba_tiny_s1l8", not_an_option=1, **TINY)
    model = timm.create_model("vmamba_tiny_s1l8", drop_path_rate=0.0, drop_rate=0.1, **TINY)
    assert model.config.drop_path_rate == 0.0 and model.config.drop_rate == 0.1


def test_hugging_face_timm_backbone():
    """transformers' TimmBackbone (when installed): feature maps and hidden states through return_layers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.TimmBackboneConfig(backbone="vmamba_tiny_s1l8", out_indices=(1, 2, 3),
                                             use_pretrained_backbone=False)
    backbone = transformers.TimmBackbone(config).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x, output_hidden_states=True)
    assert [f.shape[1] for f in out.feature_maps] == [192, 384, 768]
    assert [h.shape[1] for h in out.hidden_states] == [96, 192, 384, 768]


def test_hook_features_see_the_pre_downsample_maps():
    """feature_info names each stage's last block, so timm's hook-based wrapper works too (model layout)."""
    hook = timm.create_model("vmamba_tiny_s1l8", features_only=True, feature_cls="hook", out_indices=(1, 3),
                             dims=8, depths=(1, 2, 1, 1)).eval()
    assert hook.feature_info.module_name() == ["layers.1.blocks.1", "layers.3.blocks.0"]
    x = torch.randn(*X)
    with torch.no_grad():
        maps = hook(x)
        expected = hook.body.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    for a, b in zip(maps, expected):
        torch.testing.assert_close(a, b)


def test_load_pretrained_prefers_ema(tmp_path, monkeypatch):
    import sys

    fake_yacs_module, published_checkpoint = _convert_helpers()

    yacs = fake_yacs_module()
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs.config)
    source = timm.create_model("vmamba_tiny_s1l8", **TINY)
    state = source.state_dict()
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    path = published_checkpoint(tmp_path / "pub.pth", state, ema=ema)
    model = timm.create_model("vmamba_tiny_s1l8", **TINY)
    model.load_pretrained(path)
    torch.testing.assert_close(model.classifier.head.bias, ema["classifier.head.bias"])
    model.load_pretrained(path, use_ema=False)
    torch.testing.assert_close(model.classifier.head.bias, state["classifier.head.bias"])
    with pytest.raises(vmamba.CheckpointError, match="does not match"):
        timm.create_model("vmamba_tiny_s2l5", **TINY).load_pretrained(path)

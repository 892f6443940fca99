"""Registry, parameter counts, state-dict layouts, timm-style members and input validation."""

from __future__ import annotations

import pytest
import torch
from conftest import model_card, read_state_dict_listing, rel_err

import vmamba
from vmamba import VSSMBackbone, create_model, list_models
from vmamba.models.vssm import VSSM

PUBLISHED = [
    "vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15", "vmamba_tiny_s2l5", "vmamba_small_s1l20",
    "vmamba_base_s1l20", "vanilla_vmamba_tiny", "vanilla_vmamba_small", "vanilla_vmamba_base", "vmamba_tiny_m2",
]
MAMBA2 = ["vmamba_tiny_m2", "vmamba_small_m2", "vmamba_base_m2"]


def test_every_published_model_is_registered():
    assert set(PUBLISHED + MAMBA2) <= set(list_models())
    assert list_models("vanilla_*") == ["vanilla_vmamba_base", "vanilla_vmamba_small", "vanilla_vmamba_tiny"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_match_model_card(name):
    card = model_card()[name]
    with torch.device("meta"):
        model = create_model(name)
        headless = create_model(name, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == int(card["params_with_head"])
    assert sum(p.numel() for p in headless.parameters()) == int(card["params_without_head"])


@pytest.mark.parametrize("name", PUBLISHED + ["vmamba_tiny_s1l8_channel_last"])
def test_state_dict_matches_reference_listing(name):
    expected = read_state_dict_listing(name)
    with torch.device("meta"):
        if name.endswith("_channel_last"):
            model = create_model("vmamba_tiny_s1l8", channel_first=False)
        else:
            model = create_model(name)
    # same keys, shapes and state-dict order as the published model
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())


def test_backbone_state_dict_matches_reference_listing():
    expected = read_state_dict_listing("backbone_vmamba_tiny_s1l8")
    with torch.device("meta"):
        model = create_model("vmamba_tiny_s1l8", features_only=True)
    assert isinstance(model, VSSMBackbone)
    # same keys, shapes and state-dict order as the published model
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())
    assert sum(p.numel() for p in model.parameters()) == int(model_card()["backbone_vmamba_tiny_s1l8"]
                                                                ["params_with_head"])


@pytest.mark.parametrize("name", sorted(set(PUBLISHED + MAMBA2)))
def test_every_model_runs_forward_and_backward(name):
    model = create_model(name, num_classes=7, drop_path_rate=0.0)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 7)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def tiny(**overrides) -> VSSM:
    config = dict(dims=16, depths=(1, 1, 2, 1), num_classes=5)
    config.update(overrides)
    return create_model("vmamba_tiny_s1l8", **config)


def test_timm_style_members():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 128, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(features), model(x))
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    assert [f["num_chs"] for f in model.feature_info] == [16, 32, 64, 128]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert isinstance(model.no_weight_decay(), set)
    assert tiny(posembed=True).no_weight_decay() == {"pos_embed"}


def test_grad_checkpointing_gives_same_gradients():
    model = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, e in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(g, e)


def test_backbone_outputs_and_odd_sizes():
    """72x88 input: stage maps 18x22, 9x11, 5x6, 3x3 (v2 stem, v3 downsample), NCHW, in order."""
    model = tiny(channel_first=False)
    backbone = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 2, 1), features_only=True,
                            out_indices=(3, 1, 0, 2))
    outs = backbone(torch.randn(1, 3, 72, 88))
    assert [tuple(o.shape[2:]) for o in outs] == [(18, 22), (9, 11), (5, 6), (3, 3)]
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    assert model(torch.randn(1, 3, 72, 88)).shape == (1, 5)
    vanilla = create_model("vanilla_vmamba_tiny", dims=16, depths=(1, 1, 1, 1), num_classes=2)
    # v1 stem floors (72/4 = 18, 88/4 = 22), v1 patch merging pads odd sizes: 9x11 → 5x6 → 3x3.
    feats = vanilla.forward_features(torch.randn(1, 3, 72, 88))
    assert feats.shape == (1, 3, 3, 128)  # channel-last model: NHWC


def test_meta_device_build_and_materialise():
    with torch.device("meta"):
        model = create_model("vmamba_tiny_s1l8")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert all(not p.is_meta for p in model.parameters())


def test_channel_last_and_first_compute_the_same_function():
    first = tiny(channel_first=True).eval()
    last = tiny(channel_first=False).eval()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert rel_err(last(x), first(x)) < 1e-5


@pytest.mark.parametrize("mode", ["unidi", "bidi", "cascade2d"])
def test_scan_mode_variants_run(mode):
    model = tiny(scan_mode=mode)
    routes = {"unidi": 1, "bidi": 2, "cascade2d": 4}[mode]
    assert model.layers[0].blocks[0].op.x_proj_weight.shape[0] == routes
    x = torch.randn(1, 3, 36, 44, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_compile_fullgraph_matches_eager():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D image batch.*3-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="4-D image batch.*5-D"):
        model(torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="smaller than the 4x4 the stem needs"):
        model(torch.randn(1, 3, 3, 32))
    with pytest.raises(ValueError, match="unknown model 'vmamba_tiny_s1l9'; did you mean vmamba_tiny_s1l8"):
        create_model("vmamba_tiny_s1l9")
    with pytest.raises(ValueError, match="unknown model option.*warp_speed"):
        create_model("vmamba_tiny_s1l8", warp_speed=9)
    with pytest.raises(ValueError, match="scan_mode.*zigzag"):
        create_model("vmamba_tiny_s1l8", scan_mode="zigzag")


def test_package_exports():
    assert vmamba.create_model is create_model
    assert "vmamba_tiny_s1l8" in vmamba.list_models()


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_tiny"])
def test_channels_last_memory_format_gives_same_outputs_and_gradients(name):
    model = create_model(name, dims=16, depths=(1, 1, 2, 1), num_classes=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 40, 56, requires_grad=True)
    model(x).square().sum().backward()
    expected_out, expected_grad = model(x).detach(), x.grad.clone()
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    out = model(x_cl)
    out.square().sum().backward()
    assert rel_err(out, expected_out) < 1e-5
    assert rel_err(x_cl.grad, expected_grad) < 1e-5


def test_feature_info_modules_and_forward_intermediates_agree():
    """feature_info names the module whose output is each stage map (before its downsample)."""
    model = tiny().eval()
    captured = {}
    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        module.register_forward_hook(lambda m, i, o, name=info["module"]: captured.setdefault(name, o))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x))
    for info, feature in zip(model.feature_info, maps):
        assert feature.shape[1] == info["num_chs"] and feature.shape[2] == 64 // info["reduction"]
        assert torch.equal(captured[info["module"]], feature)
    nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)[0]
    assert torch.equal(nhwc, maps[-1].permute(0, 2, 3, 1))


def test_cpu_training_step_reads_no_uninitialised_memory():
    """Gradients do not change when freed memory is full of NaNs: nothing reads uninitialised memory
    (bf16 autocast, channels_last and gradient checkpointing, as `vmamba train` can combine them).

    32x32 input: at 16x16 the last downsampling sees 1x1 maps, where PyTorch 2.14's CPU bf16
    convolution backward itself reads uninitialised memory for the weight gradient."""
    import gc

    import torch.nn.functional as F

    import vmamba

    def poison_freed_memory():
        blocks = [torch.full((1 << n,), float("nan")) for n in range(6, 21) for _ in range(8)]
        del blocks
        gc.collect()

    def gradients(poison: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = vmamba.create_model("vmamba_tiny_s1l8", dims=16, depths=[1, 1, 1, 1], num_classes=10)
        model.set_grad_checkpointing(True)
        model = model.to(memory_format=torch.channels_last).train()
        x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
        if poison:
            poison_freed_memory()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), torch.arange(4))
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    clean, poisoned = gradients(False), gradients(True)
    differing = [name for name in clean if not torch.equal(clean[name], poisoned[name])]
    assert not differing, differing


@pytest.mark.parametrize("drop_prob, scale_by_keep", [(0.3, True), (0.3, False), (1.0, True)])
def test_block_residual_drop_path_matches_timm_drop_path(drop_prob, scale_by_keep):
    """The block's fused x + drop_path(branch) (one addcmul) draws the same masks as timm's DropPath and gives
    the same outputs and gradients; in eval mode it is a plain sum."""
    from timm.layers import DropPath

    from vmamba.layers import NormKind, SS2DConfig, VSSBlock

    torch.manual_seed(0)
    block = VSSBlock(8, SS2DConfig(), NormKind.LAYERNORM2D, 2.0, "gelu", 0.0, drop_prob)
    block.drop_path.scale_by_keep = scale_by_keep
    timm_drop = DropPath(drop_prob, scale_by_keep)
    x0, y0 = torch.randn(16, 8, 5, 5), torch.randn(16, 8, 5, 5)
    results = []
    for residual in (block._residual, lambda x, y: x + timm_drop(y)):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        torch.manual_seed(1)
        out = residual(x, y)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out) / out.numel())
        results.append((out, x.grad, y.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, atol=1e-6)
    kept = results[0][0].ne(x0).flatten(1).any(1)  # samples whose branch was added
    assert 0 < drop_prob < 1 and 0 < int(kept.sum()) < 16 or drop_prob == 1 and not kept.any()
    block.eval()
    assert torch.equal(block._residual(x0, y0), x0 + y0)

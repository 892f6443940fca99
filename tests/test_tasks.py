"""Segmentation (smp) and detection (torchvision) on VMamba: a few training steps on synthetic shapes."""

from __future__ import annotations

import pytest
import torch

import vmamba  # noqa: F401  (registers the models with timm, for smp's tu- encoders)

TINY = dict(dims=8, depths=(1, 1, 1, 1))
SIZE = 64


def synthetic_shapes(n: int, size: int = SIZE, seed: int = 0):
    """Images with 1-2 filled rectangles / ellipses of class 1 (red-ish) or 2 (green-ish) on noise.

    Returns images (n, 3, size, size) in [0, 1], semantic masks (n, size, size) and per-image targets
    (boxes xyxy, labels, instance masks) for detection.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    semantic = torch.zeros(n, size, size, dtype=torch.long)
    targets = []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        boxes, labels, masks = [], [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            label = int(torch.randint(1, 3, (1,), generator=g))
            w, h = (int(v) for v in torch.randint(size // 5, size // 2, (2,), generator=g))
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            if label == 1:
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            else:
                cx, cy = x0 + w / 2, y0 + h / 2
                mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            color = torch.tensor([0.9, 0.2, 0.1]) if label == 1 else torch.tensor([0.1, 0.8, 0.3])
            images[i][:, mask] = color[:, None]
            semantic[i][mask] = label
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append(torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32))
            labels.append(label)
            masks.append(mask.to(torch.uint8))
        targets.append(dict(boxes=torch.stack(boxes), labels=torch.tensor(labels), masks=torch.stack(masks)))
    return images, semantic, targets


def _train(model, step, iterations: int, lr: float, optimizer: str = "adamw") -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr,
                                                                                         momentum=0.9)
    losses = []
    model.train()
    for _ in range(iterations):
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _decreased(losses: list[float], k: int = 3) -> bool:
    return sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k


# -- segmentation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["upernet", "fpn", "unet"])
def test_smp_models_with_vmamba_encoder(arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    decoder = dict(upernet=dict(decoder_channels=32), fpn=dict(decoder_pyramid_channels=32,
                                                              decoder_segmentation_channels=32),
                   unet=dict(decoder_channels=(32, 16, 16, 8, 8)))[arch]
    model = smp.create_model(arch, encoder_name="tu-vanilla_vmamba_tiny" if arch == "unet" else
                             "tu-vmamba_tiny_s1l8", encoder_weights=None, classes=3, **decoder, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_upernet_builder_trains_on_synthetic_shapes(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    import timm
    from safetensors.torch import save_file

    from vmamba.tasks.segmentation import PUBLISHED_SETTING, upernet_vmamba

    assert PUBLISHED_SETTING["crop_size"] == (512, 512) and PUBLISHED_SETTING["architecture"] == "upernet"
    # encoder initialised from a classification checkpoint (safetensors)
    classifier = timm.create_model("vmamba_tiny_s1l8", **TINY)
    checkpoint = tmp_path / "cls.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(checkpoint))
    model = upernet_vmamba("vmamba_tiny_s1l8", num_classes=3, encoder_checkpoint=checkpoint, decoder_channels=32,
                           drop_path_rate=0.0, **TINY)
    stem = model.encoder.model.stem.patch_embed[0].weight
    torch.testing.assert_close(stem, classifier.patch_embed[0].weight)

    images, semantic, _ = synthetic_shapes(4)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = _train(model, lambda: loss_fn(model(images), semantic), iterations=12, lr=3e-3)
    assert _decreased(losses), losses
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (4, 3, SIZE, SIZE)
    assert torch.isfinite(logits).all()
    assert set(logits.argmax(1).unique().tolist()) <= {0, 1, 2}


# -- detection ---------------------------------------------------------------------------------------------
DET_KW = dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
              rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
              rpn_batch_size_per_image=64)


def test_maskrcnn_trains_and_predicts():
    pytest.importorskip("torchvision")
    from vmamba.tasks.detection import VMambaFPN, maskrcnn_vmamba

    model = maskrcnn_vmamba("vmamba_tiny_s1l8", num_classes=3, fpn_channels=32,
                            backbone_overrides=dict(drop_path_rate=0.0, **TINY), **DET_KW)
    assert isinstance(model.backbone, VMambaFPN)
    images, _, targets = synthetic_shapes(2, seed=1)
    batch = list(images)
    with torch.no_grad():
        features = model.backbone(images)
    assert list(features) == ["0", "1", "2", "3", "pool"] and all(f.shape[1] == 32 for f in features.values())

    losses = _train(model, lambda: sum(model(batch, targets).values()), iterations=12, lr=0.01, optimizer="sgd")
    assert _decreased(losses), losses
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == 2
    for out in outputs:
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,) and out["scores"].shape == (n,)
        assert out["masks"].shape == (n, 1, SIZE, SIZE)
        if n:
            assert ((out["labels"] >= 1) & (out["labels"] <= 2)).all()
            assert (out["boxes"][:, 2:] >= out["boxes"][:, :2]).all()
            assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
            assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()


@pytest.mark.parametrize("builder", ["fasterrcnn_vmamba", "retinanet_vmamba"])
def test_other_detectors_train_step_and_predict(builder):
    pytest.importorskip("torchvision")
    from vmamba.tasks import detection

    kwargs = dict(min_size=SIZE, max_size=SIZE)
    if builder == "fasterrcnn_vmamba":
        kwargs.update(rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)
    num_classes = 3 if builder == "fasterrcnn_vmamba" else 2
    model = getattr(detection, builder)("vanilla_vmamba_tiny", num_classes=num_classes, fpn_channels=32,
                                        backbone_overrides=dict(drop_path_rate=0.0, **TINY), **kwargs)
    images, _, targets = synthetic_shapes(2, seed=2)
    if builder == "retinanet_vmamba":
        targets = [dict(boxes=t["boxes"], labels=t["labels"] - 1) for t in targets]
    else:
        targets = [dict(boxes=t["boxes"], labels=t["labels"]) for t in targets]
    losses = _train(model, lambda: sum(model(list(images), targets).values()), iterations=3, lr=0.005,
                    optimizer="sgd")
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    with torch.no_grad():
        outputs = model(list(images))
    assert len(outputs) == 2 and all(o["boxes"].shape[-1] == 4 for o in outputs)


def test_detection_backbone_loads_classification_checkpoint(tmp_path):
    pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    from vmamba.tasks.detection import VMambaFPN

    classifier = vmamba.create_model("vmamba_tiny_s1l8", **TINY)
    path = tmp_path / "cls.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    backbone = VMambaFPN("vmamba_tiny_s1l8", out_channels=16, checkpoint=path, **TINY)
    torch.testing.assert_close(backbone.body.patch_embed[0].weight, classifier.patch_embed[0].weight)

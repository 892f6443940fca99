"""`vmamba train --data DIR` on an ImageFolder layout with the full published recipe (tiny model, few steps)."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from vmamba.cli import main
from vmamba.train.logger import Progress


def make_folder(root, classes=("circle", "square", "stripes"), per_class=12, size=20):
    for split, count in (("train", per_class), ("val", 4)):
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                img = Image.new("RGB", (size + i % 3, size), (30 + 70 * ci, 20 * (i % 5), 255 - 60 * ci))
                img.save(d / f"{i:03d}.jpg" if i % 2 else d / f"{i:03d}.png")
    return root


def test_train_on_image_folder_with_the_published_recipe(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "--data", str(data), "--output", str(out), "--threads", "1", "--img-size", "16",
                   "--model", "vmamba_tiny_s1l8", "--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]",
                   "--batch-size", "8", "--epochs", "2", "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "36 train / 12 val images, 3 classes" in text
    config = json.loads(json.dumps(torch.load(out / "last.pt", weights_only=True)["config"]))
    # the ImageNet-1K recipe is in force: mixup/cutmix, RandAugment, random erasing, EMA, clipping, bicubic
    assert (config["mixup"], config["cutmix"], config["aa"], config["reprob"]) == (0.8, 1.0, "rand-m9-mstd0.5-inc1",
                                                                                    0.25)
    assert config["model_ema"] and config["clip_grad"] == 5.0 and config["drop_path"] is None
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["class_names"] == ["circle", "square", "stripes"] and ckpt["step"] == 8
    # the LR follows 5e-4 per 512 images: global batch 8 -> 7.8e-6 peak (after the 20-epoch warm-up: lower)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] <= 5e-4 * 8 / 512 + 1e-12
    rc = main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(data)])
    assert rc == 0 and "(12 images)" in capsys.readouterr().out


def test_progress_bar_on_a_terminal_and_lines_otherwise(capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress(3, "epoch 1/1", interval=2, stream=stream)
    for step in (1, 2, 3):
        bar.update(step, loss=0.5, lr=1e-3)
    bar.close()
    assert "epoch 1/1" in stream.getvalue() and "3/3" in stream.getvalue()
    assert capsys.readouterr().out == ""
    plain = Progress(3, "epoch 1/1", interval=2, stream=io.StringIO())
    for step in (1, 2, 3):
        plain.update(step, loss=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1/1 step 2/3 loss 0.5000", "epoch 1/1 step 3/3 loss 0.5000"]


def test_pretrained_weights_with_another_head(tmp_path):
    from vmamba.train.checkpointing import export_safetensors
    from vmamba.train.engine import _load_pretrained, build_model

    arch = {"dims": 16, "depths": [1, 1, 1, 1]}
    source = build_model("vmamba_tiny_s1l8", 10, arch)
    export_safetensors(source.state_dict(), tmp_path / "src.safetensors", {"model_name": "vmamba_tiny_s1l8"})
    target = build_model("vmamba_tiny_s1l8", 3, arch)
    head_before = target.classifier.head.weight.clone()
    _load_pretrained(target, str(tmp_path / "src.safetensors"))
    assert torch.equal(target.patch_embed[0].weight, source.patch_embed[0].weight)
    assert torch.equal(target.classifier.head.weight, head_before)  # 3-class head kept fresh


def test_performance_options_run_on_cpu(tmp_path, capsys):
    """bf16 autocast, channels_last, gradient checkpointing and accumulation together (a smoke run).

    32x32 images, not 16: at 16 the last downsampling convolution sees 1x1 maps, where PyTorch 2.14's
    CPU bf16 convolution backward reads uninitialised memory for the weight gradient (NaN now and
    then; reproduced with a plain nn.Conv2d, see BENCHMARKS.md, "Test suite (CPU)").
    """
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "--output", str(tmp_path / "o"), "--threads", "1", "--img-size", "32", "--model-arg",
                   "dims=16", "--model-arg", "depths=[1,1,1,1]", "--batch-size", "8", "--accum-steps", "2",
                   "--epochs", "1", "--max-steps-per-epoch", "2", "--channels-last", "--grad-checkpointing",
                   "--amp", "bf16"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert "global batch 16" in capsys.readouterr().out
    record = json.loads((tmp_path / "o" / "metrics.jsonl").read_text())
    assert record["step"] == 2 and record["train_loss"] == record["train_loss"]  # finite, not NaN


def test_warns_about_tiny_images_with_bf16_on_cpu():
    from vmamba.train.engine import cpu_bf16_tiny_map_warning

    cpu = torch.device("cpu")
    assert "1x1 maps" in cpu_bf16_tiny_map_warning(cpu, torch.bfloat16, 16)
    assert cpu_bf16_tiny_map_warning(cpu, torch.bfloat16, 32) is None
    assert cpu_bf16_tiny_map_warning(cpu, None, 16) is None
    assert cpu_bf16_tiny_map_warning(torch.device("cuda"), torch.bfloat16, 16) is None

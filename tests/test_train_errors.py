"""Bad inputs give one clear line (exit status 2), not a traceback: one test each."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vmamba.cli import main

TINY = ["--threads", "1", "--img-size", "16", "--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]",
        "--batch-size", "8", "--base-batch", "8", "--epochs", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


def make_folder(root, classes=("a", "b"), per_class=4, size=16, splits=("train", "val")):
    for split in splits:
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 * ci + 10 * i, 100, 200)).save(d / f"{i}.png")
    return root


def test_missing_data_folder(tmp_path, capsys):
    line = run(capsys, "train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), *TINY)
    assert "data folder not found" in line and "nowhere" in line


def test_data_folder_without_train_split(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    line = run(capsys, "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o"), *TINY)
    assert "no train/ sub-folder" in line


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    line = run(capsys, "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o"), *TINY)
    assert "is empty" in line and "train" in line


def test_class_folders_without_images(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        (tmp_path / "data" / split / "cat" / "notes.txt").write_text("no image")
    line = run(capsys, "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o"), *TINY)
    assert "no images" in line


def test_unreadable_image_in_training_names_the_file(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"this is not a png")
    line = run(capsys, "train", "--data", str(root), "--output", str(tmp_path / "o"), "--workers", "0",
               "--batch-size", "9", "--base-batch", "9", "--no-aug", *TINY[:-4])
    assert "unreadable image" in line and str(bad) in line


def test_unreadable_image_in_worker_names_the_file(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    line = run(capsys, "train", "--data", str(root), "--output", str(tmp_path / "o"), "--workers", "1",
               "--batch-size", "9", "--base-batch", "9", "--no-aug", *TINY[:-4])
    assert "unreadable image" in line and str(bad) in line


def test_predict_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"garbage")
    line = run(capsys, "predict", str(bad), "--checkpoint", str(tmp_path / "missing.safetensors"))
    assert "missing.safetensors" in line  # the checkpoint is checked before any image is decoded
    ckpt = tmp_path / "tiny.safetensors"
    from vmamba.train.checkpointing import export_safetensors
    from vmamba.train.engine import build_model

    model = build_model("vmamba_tiny_s1l8", 2, {"dims": 16, "depths": [1, 1, 1, 1]})
    export_safetensors(model.state_dict(), ckpt, {"model_name": "vmamba_tiny_s1l8",
                                                  "model_args": {"dims": 16, "depths": [1, 1, 1, 1]}})
    line = run(capsys, "predict", str(bad), "--checkpoint", str(ckpt), "--img-size", "16")
    assert "unreadable image" in line and str(bad) in line
    line = run(capsys, "predict", str(tmp_path / "absent.png"), "--checkpoint", str(ckpt))
    assert "image not found" in line


def test_batch_larger_than_dataset(tmp_path, capsys):
    line = run(capsys, "train", "--output", str(tmp_path / "o"), *TINY, "--batch-size", "5000")
    assert "batch too large" in line and "1438" in line


def test_loss_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    common = ["train", "--output", str(out), *TINY, "--max-steps-per-epoch", "3", "--no-model-ema"]
    assert main(common) == 0
    capsys.readouterr()
    good = torch.load(out / "last.pt", weights_only=True)["model"]
    line = run(capsys, *common, "--resume", "auto", "--epochs", "3", "--lr", "1e30", "--clip-grad", "none",
               "--warmup-epochs", "0")
    assert "loss became" in line and "at step" in line and "last.pt" in line
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], v) for k, v in good.items())


def test_unknown_model(tmp_path, capsys):
    line = run(capsys, "train", "--model", "vmamba_tiny_s1l9", "--output", str(tmp_path / "o"))
    assert "unknown model" in line and "vmamba_tiny_s1l8" in line


def test_bad_yaml_option(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("epochs: 3\nlearning_rate: 0.1\n")
    line = run(capsys, "train", "--config", str(cfg))
    assert "unknown option(s) learning_rate" in line


def test_bad_yaml_value(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("epochs: many\n")
    line = run(capsys, "train", "--config", str(cfg))
    assert "'epochs'" in line and "many" in line


def test_resume_auto_needs_output(capsys):
    line = run(capsys, "train", "--resume", "auto")
    assert "--output" in line


def test_output_with_checkpoint_needs_resume(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"")
    line = run(capsys, "train", "--output", str(tmp_path), *TINY)
    assert "--resume auto" in line


def test_eval_missing_checkpoint(tmp_path, capsys):
    line = run(capsys, "eval", "--checkpoint", str(tmp_path / "none.pt"), "--model", "vmamba_tiny_s1l8",
               "--data", "digits")
    assert "not found" in line and "none.pt" in line


def test_eval_pickled_checkpoint_is_refused(tmp_path, capsys):
    import argparse

    path = tmp_path / "pickled.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    line = run(capsys, "eval", "--checkpoint", str(path), "--model", "vmamba_tiny_s1l8", "--data", "digits")
    assert "pickled.pth" in line

"""End to end: `vmamba train` on the built-in digits with a short schedule, then eval and predict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vmamba.cli import main

# A tiny VMamba (16 px input, dims 16, one block per stage) and one CPU thread: ~30 s on a shared core.
TINY = ["--threads", "1", "--img-size", "16", "--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]",
        "--batch-size", "32", "--base-batch", "32"]
STATED_TOP1 = 90.0  # the 4-epoch tiny run reaches ~95.8 % on this machine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("digits") / "run"
    try:
        assert main(["train", "--output", str(out), "--epochs", "4", *TINY]) == 0
        yield out  # eval / predict below also run on one thread
    finally:
        torch.set_num_threads(threads)


def test_train_reaches_stated_accuracy(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["val_top1"] >= STATED_TOP1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    csv_lines = (trained / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,train_loss") and len(csv_lines) == 5
    for name in ("last.pt", "best.pt", "model.safetensors", "model_ema.safetensors", "config.yaml"):
        assert (trained / name).is_file(), name
    assert not list(trained.glob(".*.tmp"))
    # the training checkpoint (optimizer, scheduler, RNG states, metadata) loads with weights_only=True
    ckpt = torch.load(trained / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["model_name"] == "vmamba_tiny_s1l8"
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert ckpt["optimizer"]["state"] and "model_ema" in ckpt
    final = load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in ckpt["model"].items())


def test_eval_checkpoint(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["images"] == 359
    assert result["top1"] == pytest.approx(last["val_top1"], abs=1e-3)
    assert result["ema_top1"] == pytest.approx(last["ema_top1"], abs=1e-3)
    # the exported safetensors carries the model name and architecture in its metadata
    assert main(["eval", "--checkpoint", str(trained / "model.safetensors"), "--data", "digits"]) == 0
    assert f"top-1 {last['val_top1']:.2f}%" in capsys.readouterr().out


def test_predict_images(trained, tmp_path, capsys):
    from vmamba.data import DigitsDataset

    val = DigitsDataset("val")
    paths = []
    for i in range(6):
        path = tmp_path / f"digit{i}_label{val.targets[i]}.png"
        val.image(i).save(path)
        paths.append(str(path))
    assert main(["predict", *paths, "--checkpoint", str(trained / "model.safetensors"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 6
    correct = 0
    for i, row in enumerate(rows):
        assert len(row["top"]) == 5
        probs = [t["prob"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-5
        correct += row["top"][0]["label"] == str(val.targets[i])
    assert correct >= 5
    assert main(["predict", paths[0], "--checkpoint", str(trained / "last.pt"), "--topk", "3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == paths[0] and len(text) == 4 and "%" in text[1]


def test_eval_checkpoint_of_another_model(trained, capsys):
    rc = main(["eval", "--checkpoint", str(trained / "model.safetensors"), "--model", "vmamba_tiny_s2l5",
               "--data", "digits"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "keys" in err and "layers." in err


def test_resume_refuses_another_model(trained, capsys):
    rc = main(["train", "--output", str(trained), "--resume", "auto", "--model", "vmamba_tiny_s2l5", *TINY])
    assert rc == 2
    assert "vmamba_tiny_s1l8" in capsys.readouterr().err


def test_eval_published_style_checkpoint(trained, tmp_path, capsys):
    """A .pth as the authors publish it: {'model': ..., 'model_ema': ...} with the old key names."""
    ckpt = torch.load(trained / "last.pt", map_location="cpu", weights_only=True)

    def old_names(state):
        out = {}
        for k, v in state.items():
            k = k.replace("classifier.head.", "head.").replace("classifier.norm.", "norm.")
            out[k] = v
        return out

    path = tmp_path / "vssm_published.pth"
    torch.save({"model": old_names(ckpt["model"]), "model_ema": old_names(ckpt["model_ema"]), "epoch": 4,
                "max_accuracy": 0.0}, path)
    rc = main(["eval", "--checkpoint", str(path), "--model", "vmamba_tiny_s1l8", "--model-arg", "dims=16",
               "--model-arg", "depths=[1,1,1,1]", "--data", "digits", "--img-size", "16", "--crop-pct", "1.0",
               "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "ema_top1" in result and result["images"] == 359
    # ImageNet normalisation (the default for checkpoints that do not store theirs) still classifies digits
    assert result["top1"] > 50


def test_predict_uses_imagenet_names_for_1000_classes():
    from vmamba.train.commands import _class_names

    names = _class_names({}, 1000)
    assert len(names) == 1000 and "goldfish" in names[1]
    assert _class_names({"class_names": ["cat", "dog"]}, 2) == ["cat", "dog"]
    assert _class_names({}, 3) == ["0", "1", "2"]


def test_resume_of_a_finished_run_reexports(trained, capsys):
    rc = main(["train", "--output", str(trained), "--resume", "auto", "--epochs", "4", *TINY])
    out = capsys.readouterr().out
    assert rc == 0 and "already finished" in out
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"val top-1 {last['val_top1']:.2f}%" in out

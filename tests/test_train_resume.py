"""A run killed with SIGKILL mid-epoch and continued with `--resume auto` ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import torch
from safetensors.torch import load_file

ARGS = ["--threads", "1", "--img-size", "16", "--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]",
        "--batch-size", "16", "--base-batch", "16", "--epochs", "3", "--max-steps-per-epoch", "12",
        "--warmup-epochs", "1", "--log-interval", "1", "--deterministic", "--scale", "0.5", "1.0",
        "--drop-path", "0.1"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train(out, *extra):
    cmd = [sys.executable, "-m", "vmamba", "train", "--output", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    done = _train(reference)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vmamba", "train", "--output", str(killed), *ARGS]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    watchdog = threading.Timer(240, proc.kill)  # never hang CI if the run stops printing
    watchdog.start()
    try:
        for line in proc.stdout:  # plain progress lines: not a terminal
            seen.append(line)
            if line.startswith("epoch 2/3 step 1/12"):  # early: 11 steps of margin before the epoch checkpoint
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    ckpt = torch.load(killed / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # killed mid-way through the second epoch
    assert not (killed / "model.safetensors").exists()

    resumed = _train(killed, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at epoch 1" in resumed.stdout
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]}"
    ref_metrics = (reference / "metrics.jsonl").read_text().splitlines()
    res_metrics = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(res_metrics) == 3
    for a, b in zip(map(json.loads, ref_metrics), map(json.loads, res_metrics)):
        assert a["val_top1"] == b["val_top1"] and a["train_loss"] == b["train_loss"]

"""Two-process DDP on the CPU (gloo, started by torchrun) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# No augmentation, no drop-path: the only difference between the runs is how the global batch is split.
ARGS = ["--threads", "1", "--img-size", "16", "--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]",
        "--base-batch", "32", "--epochs", "2", "--max-steps-per-epoch", "5", "--warmup-epochs", "1",
        "--no-aug", "--drop-path", "0", "--log-interval", "5"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_process_gloo_matches_one_process(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "vmamba", "train", "--output", str(one), "--batch-size", "32",
                             *ARGS], env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vmamba", "train", "--output", str(two), "--batch-size", "16", *ARGS],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout and "global batch 32" in ddp.stdout
    assert ddp.stdout.count("done: val top-1") == 1  # only rank 0 reports and writes
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [5, 10]
    for r1, r2 in zip(m1, m2):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4
        assert abs(r1["val_top1"] - r2["val_top1"]) <= 100 / 359 + 1e-6  # at most one image flips
    # the 2-process checkpoint holds one RNG state per rank and resumes with weights_only loading
    ckpt = torch.load(two / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    from vmamba.cli import main

    threads = torch.get_num_threads()
    common = ["train", *ARGS, "--epochs", "1", "--max-steps-per-epoch", "3", "--no-model-ema"]
    try:
        assert main([*common, "--output", str(tmp_path / "full"), "--batch-size", "32"]) == 0
        assert main([*common, "--output", str(tmp_path / "accum"), "--batch-size", "16", "--accum-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "accum" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.skipif(os.environ.get("VMAMBA_TEST_CUDA", "0") != "1" or torch.cuda.device_count() < 2,
                    reason="needs VMAMBA_TEST_CUDA=1 and two CUDA devices")
def test_two_gpu_nccl_matches_one_gpu(tmp_path):
    """DDP over NCCL on two GPUs (float32, deterministic cuDNN) trains the weights of one GPU with the
    same global batch."""
    gpu_args = [*ARGS, "--device", "cuda", "--amp", "none", "--deterministic"]
    single = subprocess.run([sys.executable, "-m", "vmamba", "train", "--output", str(tmp_path / "one"),
                             "--batch-size", "32", *gpu_args], env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vmamba", "train", "--output", str(tmp_path / "two"), "--batch-size", "16", *gpu_args],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "2 process(es) on cuda" in ddp.stdout and "global batch 32" in ddp.stdout
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-3, worst

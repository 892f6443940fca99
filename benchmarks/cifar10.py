"""CIFAR-10 on one GPU for a fixed time budget: a VMamba against timm ConvNeXt / ResNet, same recipe.

Data: ../shared/data/cifar10-train.tar.gz (50,000 training JPEGs, ImageFolder layout); the last 500 images
of each class are held out for validation. Images stay on the GPU as uint8 and are augmented there (random
crop with 4-pixel reflect padding, flip, random erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing
0.1) so the GPU, not JPEG decoding, sets the pace. Optimiser and schedule follow the published recipe:
AdamW, 5e-4 per 512 images, weight decay 0.05 without decay for 1-D parameters and biases, cosine with
20/300 of the budget as warm-up, gradient clipping 5.0, EMA, bf16 autocast. The schedule runs on wall
time: each model gets the same number of seconds.

    python benchmarks/cifar10.py --tar ../shared/data/cifar10-train.tar.gz --seconds 45 --out results.json
    torchrun --nproc_per_node 2 benchmarks/cifar10.py --tar ... --steps 300 --models vmamba   # DDP scaling
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODELS = {
    "vmamba": ("vmamba_tiny_s1l8", {"dims": 64, "depths": [2, 2, 6, 2]}),
    "convnext": ("convnext_pico", {}),
    "resnet": ("resnet18", {}),
}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)


def load_cifar(tar_path: str, holdout: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train images, train labels, val images, val labels, classes); the last ``holdout`` of each class -> val."""
    items: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            parts = Path(member.name).parts
            items.setdefault(parts[-2], []).append((parts[-1], tar.extractfile(member).read()))
    classes = sorted(items)
    blobs, labels, is_val = [], [], []
    for c, name in enumerate(classes):
        files = sorted(items[name])
        for k, (_, blob) in enumerate(files):
            blobs.append(blob)
            labels.append(c)
            is_val.append(k >= len(files) - holdout)
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        images = np.stack(pool.map(_decode, blobs, chunksize=512))
    labels_np, val_mask = np.asarray(labels), np.asarray(is_val)
    return images[~val_mask], labels_np[~val_mask], images[val_mask], labels_np[val_mask], classes


class GpuAugment:
    """Random crop (reflect pad 4) + horizontal flip + normalise + random erasing, on a uint8 NCHW batch."""

    def __init__(self, size: int, device: torch.device, reprob: float) -> None:
        from timm.data.random_erasing import RandomErasing

        self.size, self.device = size, device
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.erase = RandomErasing(reprob, mode="pixel", device=str(device)) if reprob > 0 else None
        self.ar = torch.arange(size, device=device)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        b = xb.shape[0]
        x = F.pad(xb.float().div_(255), (4, 4, 4, 4), mode="reflect")
        i = torch.randint(0, 9, (b,), device=self.device)
        j = torch.randint(0, 9, (b,), device=self.device)
        rows = (i[:, None] + self.ar)[:, :, None]
        cols = (j[:, None] + self.ar)[:, None, :]
        x = x[torch.arange(b, device=self.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        flip = torch.rand(b, device=self.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.erase(x) if self.erase is not None else x


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, aug: GpuAugment, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for k in range(0, len(images), batch):
        x = aug.normalise(images[k:k + batch]).contiguous(memory_format=torch.channels_last)
        with _autocast(x.device):
            logits = model(x)
        correct += (logits.argmax(1) == labels[k:k + batch]).sum().item()
    return 100.0 * correct / len(images)


def run_model(key: str, data, args, rank: int = 0, world: int = 1) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    from vmamba.train.engine import build_model

    device = _device()
    name, model_args = MODELS.get(key, (key, {}))
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(args.seed)
    model = build_model(name, 10, model_args, drop_path=args.drop_path).to(device)
    model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    global_batch = args.batch_size * world
    peak = 5e-4 * global_batch / 512
    opt = create_optimizer_v2(model, opt="adamw", lr=peak, weight_decay=0.05, filter_bias_and_bn=True)
    ticks = 1000  # the schedule runs on permille of the budget (time or steps)
    warm = round(ticks * 20 / 300)
    sched = CosineLRScheduler(opt, t_initial=ticks - warm, warmup_t=warm, warmup_lr_init=5e-7 * peak / 5e-4,
                              lr_min=5e-6 * peak / 5e-4, warmup_prefix=True, t_in_epochs=False)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion = SoftTargetCrossEntropy()
    aug = GpuAugment(32, device, reprob=0.25)
    n = len(x_train)

    def step(idx: torch.Tensor, train: bool = True) -> torch.Tensor:
        x, y = mixup(aug(x_train[idx]), y_train[idx])
        with _autocast(device):
            loss = criterion(train_model(x).float(), y)
        loss.backward()
        if train:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    g = torch.Generator(device=device).manual_seed(args.seed * 100 + rank)
    for _ in range(3):  # kernel autotuning / cuDNN selection outside the budget
        step(torch.randint(0, n, (args.batch_size,), device=device, generator=g), train=False)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    steps, elapsed, loss = 0, 0.0, torch.zeros(())
    perm = torch.randperm(n, device=device, generator=g)
    cursor = 0
    while True:
        if args.steps:
            progress = steps / args.steps
        else:
            if steps % 10 == 0:
                _sync(device)
                elapsed = time.perf_counter() - start
                if world > 1:  # all ranks must stop at the same step
                    t = torch.tensor([elapsed], device=device)
                    torch.distributed.broadcast(t, 0)
                    elapsed = t.item()
            progress = elapsed / args.seconds
        if progress >= 1:
            break
        sched.step_update(int(ticks * progress))
        if cursor + args.batch_size > n:
            perm, cursor = torch.randperm(n, device=device, generator=g), 0
        loss = step(perm[cursor:cursor + args.batch_size])
        cursor += args.batch_size
        ema.update(model, step=steps)
        steps += 1
    _sync(device)
    seconds = time.perf_counter() - start
    result = {
        "model": key if key not in MODELS else f"{key} ({name}{' ' + json.dumps(model_args) if model_args else ''})",
        "params_m": round(params / 1e6, 2), "gpus": world, "global_batch": global_batch, "steps": steps,
        "seconds": round(seconds, 1), "epochs": round(steps * global_batch / (n * world), 2),
        "images_per_s": round(steps * global_batch / seconds), "final_loss": round(float(loss.detach()), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    if name.startswith("vmamba") or name.startswith("vanilla_vmamba"):
        from vmamba.ops.selective_scan import resolve_backend

        result["scan_backend"] = resolve_backend(None, device).value
    if rank == 0:
        result["val_top1"] = round(accuracy(model, x_val, y_val, aug), 2)
        result["val_top1_ema"] = round(accuracy(ema.module, x_val, y_val, aug), 2)
    return result


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tar", default="../shared/data/cifar10-train.tar.gz")
    p.add_argument("--models", default="vmamba,convnext,resnet", help="keys (vmamba, convnext, resnet) or timm names")
    p.add_argument("--seconds", type=float, default=45.0, help="training budget per model (wall clock)")
    p.add_argument("--steps", type=int, default=0, help="fixed number of steps instead of a time budget")
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.9998)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use about this many training images (smoke tests)")
    p.add_argument("--out", default=None, help="append one JSON line per model here")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    xt, yt, xv, yv, classes = load_cifar(args.tar)
    if args.limit:  # smoke tests
        xt, yt, xv, yv = xt[:: len(xt) // args.limit], yt[:: len(yt) // args.limit], xv[::25], yv[::25]
    device = _device()
    if world > 1:  # each rank trains on its own shard of the training images
        xt, yt = xt[rank::world], yt[rank::world]
    data = (torch.from_numpy(xt).permute(0, 3, 1, 2).contiguous().to(device), torch.from_numpy(yt).to(device),
            torch.from_numpy(xv).permute(0, 3, 1, 2).contiguous().to(device), torch.from_numpy(yv).to(device))
    if rank == 0:
        print(f"data: {len(xt) * world} train / {len(xv)} val images, {len(classes)} classes, "
              f"loaded in {time.perf_counter() - t0:.1f}s; {_device_name()}", flush=True)
    for key in args.models.split(","):
        try:
            result = run_model(key.strip(), data, args, rank, world)
        except Exception as exc:  # one model failing must not cost the others their run
            import traceback

            traceback.print_exc()
            if key.strip() != "vmamba" or world > 1:
                continue
            from vmamba.ops import set_default_backend

            print(f"vmamba failed ({type(exc).__name__}: {exc}); retrying with the torch scan backend", flush=True)
            set_default_backend("torch")
            result = run_model(key.strip(), data, args, rank, world)
            result["scan_backend"] = "torch (fallback)"
            set_default_backend(None)
        if rank == 0:
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

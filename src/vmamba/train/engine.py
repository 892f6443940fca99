"""The training loop: data, model, optimiser, schedule, EMA, DDP, checkpoints and evaluation."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .._compile import compile_model
from .checkpointing import (
    BEST,
    CHECKPOINT_VERSION,
    LAST,
    atomic_torch_save,
    capture_rng_state,
    export_safetensors,
    load_training_checkpoint,
    restore_rng_state,
)
from .config import TrainConfig, scaled_lrs
from .logger import MetricsWriter, Progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# -- distributed ---------------------------------------------------------------------------------------
@dataclass
class DistState:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(device_pref: str = "auto") -> DistState:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistState(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ShardSampler(Sampler[int]):
    """Epoch-seeded shuffling, truncated to whole global batches for training and split ``rank::world``.

    With the same seed, the k-th global batch holds the same images whatever the number of processes,
    so one process with batch B and N processes with batch B/N see identical data.
    """

    def __init__(self, size: int, world: int, rank: int, seed: int, shuffle: bool, global_batch: int | None) -> None:
        self.size, self.world, self.rank, self.seed, self.shuffle = size, world, rank, seed, shuffle
        self.global_batch = global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.global_batch:
            order = order[: self.size // self.global_batch * self.global_batch]
        return order[self.rank:: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


# -- data ----------------------------------------------------------------------------------------------
def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    from ..data import CheckedImageFolder, DigitsDataset, build_eval_transform, build_train_transform, resolve_split

    eval_tf = build_eval_transform(cfg.img_size, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
                                   mean=cfg.mean, std=cfg.std)
    if cfg.aug:
        train_tf = build_train_transform(cfg.img_size, interpolation=cfg.interpolation, scale=cfg.scale,
                                         hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                                         re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
                                         mean=cfg.mean, std=cfg.std)
    else:
        train_tf = eval_tf
    if cfg.data == "digits":
        train = DigitsDataset("train", train_tf, val_fraction=cfg.val_fraction, seed=0)
        val = DigitsDataset("val", eval_tf, val_fraction=cfg.val_fraction, seed=0)
        return train, val, list(DigitsDataset.classes)
    train = CheckedImageFolder(resolve_split(cfg.data, "train"), train_tf, what="training data")
    val = CheckedImageFolder(resolve_split(cfg.data, "val"), eval_tf, what="validation data")
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise ValueError(f"train/ and val/ of {cfg.data} have different class folders (e.g. {', '.join(missing)})")
    return train, val, list(train.classes)


# -- model ---------------------------------------------------------------------------------------------
def build_model(name: str, num_classes: int, model_args: dict[str, Any] | None = None,
                drop_path: float | None = None) -> nn.Module:
    """A registered VMamba model, or a timm model (for baselines) when the name is not a VMamba one."""
    from .. import create_model, list_models

    kwargs = dict(model_args or {})
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if "depths" in kwargs and isinstance(kwargs["depths"], list):
        kwargs["depths"] = tuple(kwargs["depths"])
    if name in list_models():
        return create_model(name, num_classes=num_classes, **kwargs)
    import timm

    if timm.is_model(name):
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
        model.model_name = name
        return model
    return create_model(name, num_classes=num_classes, **kwargs)  # raises the registry's "unknown model" error


def is_vmamba(model: nn.Module) -> bool:
    from ..models import VSSM

    return isinstance(model, VSSM)


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, distributed: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        totals[0] += hit[:, :1].sum()
        totals[1] += hit.sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum")
        totals[3] += targets.numel()
    if distributed:
        dist.all_reduce(totals)
    n = max(1.0, totals[3].item())
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
            "loss": totals[2].item() / n, "count": int(totals[3].item())}


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` (None: off); ``cache=False`` (CUDA graphs) recasts the weights every call."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def graph_for_training(model: nn.Module, batch_shape: tuple[int, ...], amp_dtype: torch.dtype | None,
                       channels_last: bool, warmup_iters: int = 3) -> nn.Module:
    """``model`` with its training forward and backward captured as CUDA graphs and replayed on every call
    (``torch.cuda.make_graphed_callables``): no per-kernel host cost. Calls must use inputs of
    ``batch_shape`` under autocast to ``amp_dtype`` with the cache off; in eval mode the model runs eagerly.
    The warm-up runs before capture draw from the CUDA RNG and leave the weights, buffers (BatchNorm
    statistics) and ``.grad`` untouched.

    The parameters' ``.grad`` may alias the graph's static gradient buffers, which the next replay
    overwrites: use the gradients (optimizer step) before the next call, and do not accumulate them
    over several calls (pytorch/pytorch#181723).

    PyTorch's AccumulateGrad stream warning is turned off for the process while the graphs are in use
    (the capture's warm-up runs on a side stream, which the gradient accumulators remember; the
    accumulation itself is outside the graphs); it is turned back on if the capture fails.
    """
    sample = torch.randn(batch_shape, device="cuda")
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    model.train()
    # the warm-up runs on random inputs would otherwise move BatchNorm running statistics
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    warn_on_accumulate_grad_stream_mismatch(False)
    try:
        with _autocast(sample.device, amp_dtype, cache=False):
            return torch.cuda.make_graphed_callables(model, (sample,), num_warmup_iters=warmup_iters)
    except BaseException:
        warn_on_accumulate_grad_stream_mismatch(True)
        raise
    finally:  # also when the capture fails and training goes on eagerly
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def warn_on_accumulate_grad_stream_mismatch(enabled: bool) -> None:
    """PyTorch's warning when a gradient accumulator runs on another stream than it was made on (torch >= 2.9)."""
    setter = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if setter is not None:
        setter(enabled)


def use_cuda_graph(requested: bool | None, device: torch.device, distributed: bool, compiled: bool,
                   grad_checkpointing: bool, accumulating: bool = False) -> bool:
    """Whether to train through :func:`graph_for_training`: as ``requested`` (True is refused where it
    cannot apply), else (None) wherever it applies: one CUDA process, without torch.compile, gradient
    checkpointing or gradient accumulation over micro-batches."""
    one_cuda_process = device.type == "cuda" and not distributed
    if requested and not one_cuda_process:
        found = "several processes" if distributed else device.type
        raise ValueError(f"cuda-graph needs one CUDA process (found {found})")
    if requested is None:
        return one_cuda_process and not compiled and not grad_checkpointing and not accumulating
    return requested


def cpu_bf16_tiny_map_warning(device: torch.device, amp_dtype: torch.dtype | None, img_size: int) -> str | None:
    """A warning for images of 16 px or less under bf16 autocast on the CPU, else None.

    The last downsampling then sees a 1x1 map, where PyTorch 2.14's CPU bf16 convolution backward
    reads uninitialised memory for the weight gradient (BENCHMARKS.md, "Test suite (CPU)").
    """
    if device.type != "cpu" or amp_dtype != torch.bfloat16 or img_size > 16:
        return None
    return (f"--img-size {img_size} with bf16 on the CPU: the last downsampling sees 1x1 maps, where PyTorch's "
            "CPU bf16 convolution backward is unreliable (NaN losses now and then); use 32 px or more, "
            "or --amp none")


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if amp == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA GPU; use --amp bf16 or none on the CPU")
    return torch.float16, True


# -- training ------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: Path
    epochs_run: int
    top1: float
    top5: float
    ema_top1: float | None
    best_top1: float
    seconds: float
    images_per_second: float


def default_output(cfg: TrainConfig) -> Path:
    data_name = "digits" if cfg.data == "digits" else Path(cfg.data).name or "data"
    return Path("runs") / f"{data_name}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> TrainResult:
    """Run a full training; ``resume`` is None, 'auto' (latest in the output folder) or a checkpoint path."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = setup_distributed(cfg.device)
    main = ds.main
    if resume == "auto" and not cfg.output:
        raise ValueError("--resume auto needs --output DIR (the folder whose latest checkpoint to continue)")
    out_dir = Path(cfg.output) if cfg.output else default_output(cfg)
    resume_path: Path | None = None
    if resume == "auto":
        resume_path = out_dir / LAST if (out_dir / LAST).is_file() else None
    elif resume:
        resume_path = Path(resume)
        if not resume_path.is_file():
            raise ValueError(f"--resume: checkpoint file not found: {resume_path}")
    elif (out_dir / LAST).is_file():
        raise ValueError(f"output folder {out_dir} already holds a checkpoint; pass --resume auto to continue it "
                         "or choose another --output")

    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif ds.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # data ------------------------------------------------------------------------------------------
    train_set, val_set, class_names = build_datasets(cfg)
    num_classes = len(class_names)
    global_micro = cfg.batch_size * ds.world
    global_batch = global_micro * cfg.accum_steps
    if len(train_set) < global_batch:
        raise ValueError(f"batch too large: {cfg.batch_size} x {ds.world} process(es) x {cfg.accum_steps} "
                         f"accumulation step(s) = {global_batch} images per step, but the training set has only "
                         f"{len(train_set)} images")
    if len(val_set) == 0:
        raise ValueError("the validation set is empty")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"Mixup/CutMix need an even per-process batch size, got {cfg.batch_size}")
    train_sampler = ShardSampler(len(train_set), ds.world, ds.rank, cfg.seed, True, global_micro)
    val_sampler = ShardSampler(len(val_set), ds.world, ds.rank, cfg.seed, False, None)
    pin = ds.device.type == "cuda"
    val_loader = DataLoader(val_set, batch_size=max(cfg.batch_size, 64), sampler=val_sampler,
                            num_workers=cfg.workers, pin_memory=pin, persistent_workers=cfg.workers > 0)
    micro_per_epoch = len(train_sampler) // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * min(cfg.warmup_epochs, cfg.epochs)

    # model, optimiser, schedule, EMA ---------------------------------------------------------------
    seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg.model, num_classes, cfg.model_args, cfg.drop_path)
    if cfg.pretrained:
        _load_pretrained(model, cfg.pretrained)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    model.to(ds.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype, use_scaler = resolve_amp(cfg.amp, ds.device)
    warning = cpu_bf16_tiny_map_warning(ds.device, amp_dtype, cfg.img_size)
    if warning and ds.main:
        print(f"vmamba train: warning: {warning}", file=sys.stderr)
    scaler = torch.amp.GradScaler(ds.device.type, enabled=use_scaler)
    peak_lr, warmup_lr, min_lr = scaled_lrs(cfg, global_batch)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=peak_lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps, betas=tuple(cfg.betas), filter_bias_and_bn=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                                  warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True,
                                  cycle_limit=1, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.model_ema else None
    mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                  switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                  num_classes=num_classes) if mixup_on else None
    if mixup_on:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    start_epoch, global_step, best_top1 = 0, 0, -1.0
    rng_to_restore = None
    if resume_path is not None:
        ckpt = load_training_checkpoint(resume_path)
        if ckpt.get("model_name") != cfg.model:
            raise ValueError(f"cannot resume: {resume_path} was trained as {ckpt.get('model_name')!r}, "
                             f"not {cfg.model!r}")
        from ..models import load_checkpoint

        if is_vmamba(model):
            load_checkpoint(model, ckpt["model"], strict=True)
        else:
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as exc:
                from ..models import CheckpointError

                raise CheckpointError(f"cannot resume from {resume_path}: {str(exc).splitlines()[0]}") from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:
            raise ValueError(f"cannot resume from {resume_path}: optimizer state does not fit ({exc})") from None
        # the schedule is a function of the step: rebuilt from the (possibly changed) config, not loaded
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and "model_ema" in ckpt:
            ema.module.load_state_dict(ckpt["model_ema"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["step"])
        for group in optimizer.param_groups:
            group["initial_lr"] = peak_lr
        scheduler.step_update(global_step)
        best_top1 = float(ckpt.get("best_top1", -1.0))
        states = ckpt.get("rng") or []
        rng_to_restore = states[ds.rank] if len(states) == ds.world else None
        if main:
            log(f"resumed from {resume_path} at epoch {start_epoch} (step {global_step})")
    train_model: nn.Module = model
    graphed = use_cuda_graph(cfg.cuda_graph, ds.device, ds.distributed, cfg.compile, cfg.grad_checkpointing,
                             accumulating=cfg.accum_steps > 1)
    if graphed:
        try:
            train_model = graph_for_training(model, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), amp_dtype,
                                             cfg.channels_last)
        except RuntimeError as exc:
            if cfg.cuda_graph:  # asked for explicitly: the failure is the answer
                raise
            graphed = False
            if main:
                log(f"CUDA-graph capture failed ({str(exc).splitlines()[0]}); training eagerly "
                    "(--no-cuda-graph skips the attempt)")
    if cfg.compile:
        train_model = compile_model(train_model, cfg.compile_mode)
    if ds.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ds.local_rank] if ds.device.type == "cuda" else None)
    if rng_to_restore is not None:
        restore_rng_state(rng_to_restore)
    elif start_epoch == 0 or resume_path is None:
        seed_everything(cfg.seed + ds.rank)  # per-rank augmentation / drop-path randomness
    else:
        seed_everything(cfg.seed + ds.rank + 7919 * start_epoch)

    metrics = MetricsWriter(out_dir, enabled=main)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        metrics.truncate_after(start_epoch)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training {cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.data}: {len(train_set)} train / "
            f"{len(val_set)} val images, {num_classes} classes; {ds.world} process(es) on {ds.device.type}, "
            f"global batch {global_batch}, peak lr {peak_lr:.3g}, {cfg.epochs} epochs x {steps_per_epoch} steps"
            f"{', forward and backward replayed as CUDA graphs' if graphed else ''}; output {out_dir}")

    def make_checkpoint(epoch: int, val: dict[str, float], ema_val: dict[str, float] | None) -> dict[str, Any]:
        rng = capture_rng_state()
        if ds.distributed:
            gathered: list[Any] = [None] * ds.world
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "model_name": cfg.model,
            "model_args": dict(cfg.model_args),
            "class_names": class_names,
            "config": cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else {},
            "epoch": epoch,
            "step": global_step,
            "best_top1": best_top1,
            "val": dict(val),
            "rng": rng_states,
        }
        if ema is not None:
            ckpt["model_ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
        if ema_val is not None:
            ckpt["val_ema"] = dict(ema_val)
        return ckpt

    # loop ------------------------------------------------------------------------------------------
    t_start = time.perf_counter()
    images_seen = 0
    val: dict[str, float] = {"top1": float("nan"), "top5": float("nan")}
    ema_val: dict[str, float] | None = None
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        loader_gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch * 101 + ds.rank)
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True,
                                  num_workers=cfg.workers, pin_memory=pin, generator=loader_gen)
        train_model.train()
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.log_interval, enabled=main)
        loss_sum, loss_count = torch.zeros((), device=ds.device), 0
        t_epoch = time.perf_counter()
        micro = 0
        step_in_epoch = 0
        optimizer.zero_grad(set_to_none=True)
        for images, targets in train_loader:
            images = images.to(ds.device, non_blocking=True)
            targets = targets.to(ds.device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = (micro + 1) % cfg.accum_steps == 0
            sync = contextlib.nullcontext() if (last_micro or not ds.distributed) else train_model.no_sync()
            with sync:
                with _autocast(ds.device, amp_dtype, cache=not graphed):
                    output = train_model(images)
                loss = criterion(output.float(), targets)
                value = loss.detach()
                check = value
                if ds.distributed:  # every rank must see a NaN on any rank, or the others would hang
                    check = value.clone()
                    dist.all_reduce(check)
                scaler.scale(loss / cfg.accum_steps).backward()
                # checked once the backward is queued, so the GPU stays busy while the host waits
                if not torch.isfinite(check):
                    last = out_dir / LAST
                    keep = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
                    raise TrainingDiverged(f"loss became {check.item()} at step {global_step + 1} "
                                           f"(epoch {epoch + 1}); training stopped, {keep}")
            micro += 1
            loss_sum += value
            loss_count += 1
            images_seen += images.shape[0] * ds.world
            if not last_micro:
                continue
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            step_in_epoch += 1
            scheduler.step_update(global_step)
            if ema is not None:
                ema.update(model, step=global_step)
            if main:
                lr = optimizer.param_groups[0]["lr"]
                if step_in_epoch % cfg.log_interval == 0 or progress.bar is not None or \
                        step_in_epoch == steps_per_epoch:
                    elapsed = time.perf_counter() - t_epoch
                    progress.update(step_in_epoch, loss=value.item(), lr=lr,
                                    img_s=round(step_in_epoch * global_batch / max(elapsed, 1e-9), 1))
            if step_in_epoch >= steps_per_epoch:
                break
        progress.close()
        epoch_time = time.perf_counter() - t_epoch
        val = evaluate(model, val_loader, ds.device, amp_dtype, cfg.channels_last, ds.distributed)
        ema_val = evaluate(ema.module, val_loader, ds.device, amp_dtype, cfg.channels_last, ds.distributed) \
            if ema is not None else None
        loss_stats = torch.stack([loss_sum.float(), torch.tensor(float(loss_count), device=ds.device)])
        if ds.distributed:
            dist.all_reduce(loss_stats)
        train_loss = (loss_stats[0] / loss_stats[1].clamp(min=1)).item()
        is_best = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        ckpt = make_checkpoint(epoch + 1, val, ema_val)
        if main:
            record = {"epoch": epoch + 1, "step": global_step, "train_loss": round(train_loss, 6),
                      "lr": optimizer.param_groups[0]["lr"], "val_loss": round(val["loss"], 6),
                      "val_top1": round(val["top1"], 4), "val_top5": round(val["top5"], 4),
                      "ema_top1": round(ema_val["top1"], 4) if ema_val else None,
                      "epoch_seconds": round(epoch_time, 3),
                      "images_per_second": round(steps_per_epoch * global_batch / max(epoch_time, 1e-9), 2)}
            metrics.write(record)
            atomic_torch_save(ckpt, out_dir / LAST)
            if is_best:
                _atomic_copy(out_dir / LAST, out_dir / BEST)
            ema_text = f", EMA top-1 {ema_val['top1']:.2f}%" if ema_val else ""
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
                f"top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%{ema_text} ({epoch_time:.1f}s)")
        if ds.distributed:
            dist.barrier()
    if start_epoch >= cfg.epochs:  # resumed a finished run: report its weights
        val = evaluate(model, val_loader, ds.device, amp_dtype, cfg.channels_last, ds.distributed)
        ema_val = evaluate(ema.module, val_loader, ds.device, amp_dtype, cfg.channels_last, ds.distributed) \
            if ema is not None else None
        if main:
            log(f"{resume_path} already finished all {cfg.epochs} epochs; exporting its weights")
    seconds = time.perf_counter() - t_start
    if main:
        meta = {"model_name": cfg.model, "model_args": dict(cfg.model_args), "class_names": class_names,
                "config": cfg.to_dict()}
        export_safetensors(_unwrap(model).state_dict(), out_dir / "model.safetensors", meta)
        if ema is not None:
            export_safetensors(ema.module.state_dict(), out_dir / "model_ema.safetensors", meta)
    metrics.close()
    if ds.distributed:
        dist.barrier()
    return TrainResult(out_dir, cfg.epochs - start_epoch, val["top1"], val["top5"],
                       ema_val["top1"] if ema_val else None, best_top1, seconds,
                       images_seen / max(seconds, 1e-9))


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _load_pretrained(model: nn.Module, path: str) -> None:
    """Initial weights; a classifier head of another size is left at its fresh initialisation."""
    from ..models import load_checkpoint
    from .checkpointing import read_checkpoint_with_meta

    obj, _ = read_checkpoint_with_meta(path)
    from ..models.checkpoint import remap_keys, unwrap_state_dict

    state = remap_keys(unwrap_state_dict(obj))
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and v.shape != own[k].shape and "head" in k]
    for k in dropped:
        state.pop(k)
    if is_vmamba(model):
        load_checkpoint(model, state, strict=False)
    else:
        model.load_state_dict(state, strict=False)


def state_dict_num_classes(state: dict[str, Tensor]) -> int | None:
    for key in ("classifier.head.weight", "head.weight", "head.fc.weight", "fc.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None

"""Throughput and peak memory of inference and training steps, for our models and timm models.

Each measurement builds the model for one input size, moves it to the device (optionally
channels_last and torch.compile), runs ``warmup`` untimed iterations, synchronises, then times
``iters`` iterations and synchronises again. Inference runs under ``torch.inference_mode`` in eval
mode; a training step is forward + cross-entropy on random labels + backward + SGD step.
Reduced precision (bf16 / fp16) uses autocast (fp16 training also a GradScaler on CUDA); TF32 is
switched on or off for the run and restored afterwards.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` over the timed iterations (reset
before them). On the CPU no per-run allocator statistics exist: the process's peak resident set
size (a high-water mark over the whole process, so only ever growing) is reported instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._compile import check_compile_mode, compile_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train")


@dataclasses.dataclass
class BenchSettings:
    batch_size: int = 32
    dtype: str = "fp32"
    tf32: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"  # "reduce-overhead" replays CUDA graphs: no per-kernel launch cost
    cuda_graph: bool = False  # capture the eager step once as a CUDA graph and replay it (CUDA only)
    warmup: int = 5
    iters: int = 20
    device: str = "auto"
    modes: tuple[str, ...] = MODES
    with_flops: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        check_compile_mode(self.compile_mode)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown bench mode(s) {bad}; choose from {', '.join(MODES)}")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph replays the eager model; it cannot be combined with compile "
                             "(compile_mode='reduce-overhead' is torch.compile's own CUDA graphs)")
        if self.batch_size < 1 or self.iters < 1 or self.warmup < 0:
            raise ValueError("batch size and iterations must be >= 1 and warm-up >= 0")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if self.cuda_graph and device.type != "cuda":
                raise ValueError("cuda_graph needs a CUDA device, and none is available")
            return device
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_enabled(enabled: bool) -> Iterator[None]:
    """Set TF32 for matmuls and cuDNN convolutions, restoring the previous flags on exit."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _autocast(device: torch.device, dtype: str, cache: bool = True):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype], cache_enabled=cache)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _num_classes(model: nn.Module) -> int:
    classes = int(getattr(model, "num_classes", 0) or 0)
    return classes if classes > 0 else 1000


def _prepare(model: nn.Module, settings: BenchSettings, device: torch.device) -> nn.Module:
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_one(model: nn.Module, size: tuple[int, int], mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Time one (model, size, mode); returns a row with images/s, ms/iter and peak memory."""
    device = settings.resolved_device()
    model = _prepare(model, settings, device)
    in_chans = int(getattr(model, "in_chans", 3))
    x = torch.randn(settings.batch_size, in_chans, *size, device=device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    runner: nn.Module = model
    if settings.compile:
        runner = compile_model(model, settings.compile_mode, settings.compile_backend)
    if mode == "infer" and settings.cuda_graph:
        from ..cuda_graph import graph_for_inference

        amp = None if settings.dtype == "fp32" else DTYPES[settings.dtype]
        with tf32_enabled(settings.tf32):
            graphed = graph_for_inference(model, x, amp, clone_outputs=False)

        def step() -> None:
            graphed(x)
    elif mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), _autocast(device, settings.dtype):
                runner(x)
    else:
        model.train()
        labels = torch.randint(0, _num_classes(model), (settings.batch_size,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=settings.dtype == "fp16" and device.type == "cuda")
        if settings.cuda_graph:  # forward and backward replayed; loss and optimizer eager (as vmamba train)
            from ..train.engine import graph_for_training

            amp = None if settings.dtype == "fp32" else DTYPES[settings.dtype]
            with tf32_enabled(settings.tf32):
                runner = graph_for_training(model, tuple(x.shape), amp, settings.channels_last)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, settings.dtype, cache=not settings.cuda_graph):
                out = runner(x)
                if isinstance(out, (list, tuple)):
                    out = out[-1]
                if out.dim() != 2:
                    out = out.flatten(1)
                loss = nn.functional.cross_entropy(out.float(), labels % out.shape[1])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    with tf32_enabled(settings.tf32):
        for _ in range(settings.warmup):
            step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(settings.iters):
            step()
        synchronize(device)
        elapsed = time.perf_counter() - start
    row: dict[str, Any] = {
        "img_per_s": settings.batch_size * settings.iters / elapsed,
        "ms_per_iter": 1000 * elapsed / settings.iters,
    }
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_rss_mb"] = _peak_rss_mb()
    return row


def bench_models(names: Sequence[str], sizes: Sequence[tuple[int, int]], settings: BenchSettings,
                 overrides: dict[str, Any] | None = None, checkpoints: dict[str, str] | None = None,
                 log=print) -> list[dict[str, Any]]:
    """One row per (model, size, mode). Failures (e.g. out of memory) become rows with a status."""
    from ._common import build_model, count_params, is_vmamba_model
    from .flops import count_model_flops

    rows = []
    device = settings.resolved_device()
    for name in names:
        extra = dict(overrides or {}) if is_vmamba_model(name) else {}
        for size in sizes:
            base = {"model": name, "size": f"{size[0]}x{size[1]}", "batch": settings.batch_size}
            try:
                torch.manual_seed(0)
                model = build_model(name, checkpoint=(checkpoints or {}).get(name), img_size=size, **extra)
            except (ValueError, TypeError, RuntimeError) as exc:
                rows.append({**base, "status": f"build failed: {exc}"})
                continue
            info = {"params_M": count_params(model) / 1e6}
            if settings.with_flops:
                try:
                    info["GFLOPs"] = count_model_flops(name, size, **extra).gflops
                except Exception:  # noqa: BLE001 - FLOPs are informative only
                    info["GFLOPs"] = None
            for mode in settings.modes:
                row = {**base, "mode": mode, **info}
                try:
                    row.update(run_one(model, size, mode, settings))
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except RuntimeError as exc:
                    row["status"] = f"error: {str(exc).splitlines()[0][:120]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                if log is not None:
                    speed = f"{row['img_per_s']:.1f} img/s" if "img_per_s" in row else row["status"]
                    log(f"  {name} {base['size']} {mode}: {speed}")
            del model
    return rows


def environment(settings: BenchSettings) -> dict[str, Any]:
    device = settings.resolved_device()
    env = {**dataclasses.asdict(settings), "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def plot_throughput(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """PNG: images/s against input resolution, one line per model, one panel per mode."""
    from ._common import require_matplotlib

    plt = require_matplotlib()
    modes = [m for m in MODES if any(r.get("mode") == m for r in rows)]
    if not modes:
        raise ValueError("no successful measurements to plot")
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        models = list(dict.fromkeys(r["model"] for r in rows if r.get("mode") == mode))
        for model in models:
            points = [(int(r["size"].split("x")[0]), r["img_per_s"]) for r in rows
                      if r.get("mode") == mode and r["model"] == model and r.get("status") == "ok"]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=model)
        ax.set_xlabel("input resolution (pixels per side)")
        ax.set_ylabel("images / s")
        ax.set_yscale("log")
        ax.set_title(f"{'inference' if mode == 'infer' else 'training step'} {title}".strip(), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

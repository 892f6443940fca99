"""Training configuration: the published ImageNet-1K recipe, the built-in digits preset, YAML files and flags.

Precedence, lowest first: recipe defaults → the model's own drop-path rate → the digits preset (when
training on the built-in dataset) → ``--config FILE.yaml`` → command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from .._compile import check_compile_mode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class TrainConfig:
    """Every knob of ``vmamba train``; defaults are the published ImageNet-1K recipe (Swin-derived)."""

    # model
    model: str = "vmamba_tiny_s1l8"
    model_args: dict = dataclasses.field(default_factory=dict)  # create_model overrides (dims, depths, ...)
    drop_path: float | None = None  # None: the model's published rate
    pretrained: str | None = None  # initial weights (head may differ: it is re-initialised)
    # data
    data: str = "digits"  # "digits" (built in) or a folder with train/ and val/ (ImageFolder layout)
    val_fraction: float = 0.2  # digits only
    img_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    workers: int = 8
    # schedule
    epochs: int = 300
    warmup_epochs: int = 20
    batch_size: int = 128  # per process
    accum_steps: int = 1
    base_lr: float = 5e-4  # per base_batch images, scaled linearly with the global batch
    base_batch: int = 512
    lr: float | None = None  # absolute peak LR; overrides the scaling rule
    warmup_lr: float = 5e-7  # scaled like base_lr
    min_lr: float = 5e-6  # scaled like base_lr
    # optimiser
    opt: str = "adamw"
    opt_eps: float = 1e-8
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    # regularisation and augmentation
    aug: bool = True  # False: train on eval-transformed images (no random crop/flip/RandAugment/erasing)
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    aa: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    scale: tuple[float, ...] = (0.08, 1.0)
    model_ema: bool = True
    ema_decay: float = 0.9999
    # performance
    amp: str = "auto"  # auto (bf16 where supported, else fp16 with a scaler; none on CPU), bf16, fp16, none
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # with compile: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    # replay the model's forward and backward as CUDA graphs; None: wherever that applies (one CUDA
    # process; no compile, grad_checkpointing or gradient accumulation)
    cuda_graph: bool | None = None
    grad_checkpointing: bool = False
    device: str = "auto"  # auto, cpu, cuda
    threads: int | None = None  # CPU threads per process (torch.set_num_threads); None: torch's default
    # run
    output: str | None = None
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50
    max_steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (quick runs, tests)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

# The built-in dataset: a small VMamba on 8x8 digits resized to 32x32, CPU-friendly, >= 95 % val top-1.
DIGITS_PRESET: dict[str, Any] = dict(
    model="vmamba_tiny_s1l8",
    model_args=dict(dims=32, depths=[1, 1, 2, 1]),
    drop_path=0.05,
    img_size=32,
    crop_pct=1.0,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    workers=0,
    threads=1,  # robust on a busy machine (several threads on shared cores can run 10x slower)
    epochs=15,
    warmup_epochs=1,
    batch_size=64,
    base_lr=2e-3,
    base_batch=64,
    warmup_lr=1e-5,
    min_lr=1e-5,
    mixup=0.0,
    cutmix=0.0,
    aa=None,
    color_jitter=0.0,
    reprob=0.0,
    hflip=0.0,
    scale=(0.7, 1.0),
    ema_decay=0.99,
    log_interval=10,
)


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one YAML/flag value to the field's type; a ValueError names the field."""
    hint = _HINTS[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError(f"config {name!r} may not be empty")
    base = next((a for a in args if a is not type(None)), hint) if origin in (typing.Union, _union_type()) else hint
    base_origin = typing.get_origin(base) or base
    try:
        if base_origin is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            return bool(value)
        if base_origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base_origin is float:
            return float(value)
        if base_origin is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if base_origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return tuple(float(v) for v in value)
        if base_origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name!r}: cannot use {value!r} (expected {_type_name(hint)})") from None
    return value


def _union_type():
    import types

    return getattr(types, "UnionType", typing.Union)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML recipe file, with unknown keys rejected by name."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    unknown = sorted(k for k in data if k not in FIELDS)
    if unknown:
        raise ValueError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def build_config(yaml_values: dict[str, Any] | None = None, flag_values: dict[str, Any] | None = None) -> TrainConfig:
    """Layer recipe → model drop-path → digits preset → YAML → flags into a checked TrainConfig."""
    yaml_values = dict(yaml_values or {})
    flag_values = dict(flag_values or {})
    data = flag_values.get("data", yaml_values.get("data", "digits"))
    values: dict[str, Any] = {}
    if str(data) == "digits":
        values.update(DIGITS_PRESET)
    for layer in (yaml_values, flag_values):
        for key, value in layer.items():
            if key == "model_args" and isinstance(value, dict):
                # a model named on a higher layer does not inherit a preset's architecture overrides
                base = values.get("model_args", {}) if "model" not in layer else {}
                values["model_args"] = {**base, **value}
            else:
                if key == "model" and "model_args" not in layer and value != values.get("model"):
                    values["model_args"] = {}
                values[key] = value
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    positive = dict(epochs=c.epochs, batch_size=c.batch_size, accum_steps=c.accum_steps, img_size=c.img_size,
                    base_batch=c.base_batch, log_interval=c.log_interval)
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be positive, got {value}")
    if c.warmup_epochs < 0:
        raise ValueError(f"warmup-epochs must be >= 0, got {c.warmup_epochs}")  # more than epochs: all warm-up
    if c.lr is not None and c.lr <= 0 or c.base_lr <= 0:
        raise ValueError("learning rate must be positive")
    if c.amp not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {c.amp!r}")
    check_compile_mode(c.compile_mode)
    if c.compile_mode != "default" and not c.compile:
        raise ValueError(f"compile-mode {c.compile_mode} needs --compile")
    if c.cuda_graph:
        # make_graphed_callables hands out its static gradient buffers, which the next micro-batch's
        # replay overwrites before they are accumulated (pytorch/pytorch#181723)
        for clash, name in ((c.compile, "--compile"), (c.grad_checkpointing, "--grad-checkpointing"),
                            (c.device == "cpu", "--device cpu"), (c.accum_steps > 1, "--accum-steps > 1")):
            if clash:
                raise ValueError(f"cuda-graph cannot be combined with {name}")
    if c.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {c.device!r}")
    if not 0 < c.crop_pct <= 1:
        raise ValueError(f"crop-pct must be in (0, 1], got {c.crop_pct}")
    if len(c.mean) != 3 or len(c.std) != 3:
        raise ValueError("mean and std need 3 values each")
    if c.max_steps_per_epoch is not None and c.max_steps_per_epoch <= 0:
        raise ValueError("max-steps-per-epoch must be positive")
    if c.threads is not None and c.threads <= 0:
        raise ValueError("threads must be positive")
    if c.workers < 0:
        raise ValueError("workers must be >= 0")


def scaled_lrs(c: TrainConfig, global_batch: int) -> tuple[float, float, float]:
    """(peak, warm-up start, minimum) LR: base values times global_batch / base_batch (Swin's rule)."""
    factor = global_batch / c.base_batch
    peak = c.lr if c.lr is not None else c.base_lr * factor
    ratio = peak / c.base_lr
    return peak, c.warmup_lr * ratio, c.min_lr * ratio


# -- command-line flags ----------------------------------------------------------------------------------
_HELP = {
    "model": "registered model name (see `vmamba models`)",
    "data": "'digits' (built in, default) or a folder with train/ and val/ class folders",
    "drop_path": "stochastic depth rate (default: the model's published rate)",
    "lr": "absolute peak learning rate (default: base-lr x global batch / base-batch)",
    "amp": "mixed precision: auto, bf16, fp16 or none",
    "compile_mode": "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: no per-kernel host "
                    "cost, which bounds eager VMamba training on fast GPUs; fixed batch shapes), max-autotune or "
                    "max-autotune-no-cudagraphs",
    "cuda_graph": "capture the model's forward and backward once as CUDA graphs and replay them every step: no "
                  "per-kernel host cost (CUDA, one process; not with --compile, --grad-checkpointing or "
                  "--accum-steps > 1). "
                  "Default: on wherever it applies; --no-cuda-graph trains eagerly",
    "output": "output folder for checkpoints and logs (default runs/<data>-<model>-<time>)",
    "max_steps_per_epoch": "stop each epoch after this many optimiser steps",
}


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--name`` flag per TrainConfig field; flags not given leave no attribute (``none`` gives None)."""
    group = parser.add_argument_group("recipe overrides (also settable in --config YAML)")
    for name in FIELDS:
        if name in skip or name == "model_args":
            continue
        flag = "--" + name.replace("_", "-")
        hint = _HINTS[name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple \
            else hint
        common = dict(dest=name, default=argparse.SUPPRESS,
                      help=_HELP.get(name) or f"(recipe default: {FIELDS[name].default!r})")
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(base) is tuple or base is tuple:
            group.add_argument(flag, nargs="+", type=float, metavar="X", **common)
        elif base in (int, float):
            group.add_argument(flag, type=_none_or(base), **common)
        else:  # "none" means None only where the option may be empty (--amp none is a value)
            group.add_argument(flag, type=_none_or(str) if type(None) in args else str, **common)
    group.add_argument("--model-arg", dest="model_arg", action="append", default=[], metavar="KEY=VALUE",
                       help="architecture override passed to create_model, e.g. dims=32 or depths=[1,1,2,1]")


def _none_or(kind: type):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def parse_model_args(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def flags_to_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values given on the command line (not-given flags are left out)."""
    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}  # 'none' given: None
    # tuples given on the command line arrive as lists of floats
    model_args = parse_model_args(getattr(args, "model_arg", []) or [])
    if model_args:
        values["model_args"] = model_args
    return values


def recipe_yaml(model: str) -> str:
    """The published ImageNet-1K recipe for ``model`` as YAML (what configs/imagenet1k/*.yaml hold)."""
    from .. import get_config

    c = TrainConfig(model=model, data="/path/to/imagenet", drop_path=get_config(model).drop_path_rate)
    d = c.to_dict()
    for key in ("output", "pretrained", "lr", "model_args", "max_steps_per_epoch", "val_fraction"):
        d.pop(key)
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)

"""``vmamba train``, ``vmamba eval`` and ``vmamba predict``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import add_config_flags, build_config, flags_to_values, load_yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (no arguments: a small VMamba on the built-in digits, on the CPU)",
        description="Train a VMamba classifier. With no arguments: a small VMamba on scikit-learn's digits "
                    "(CPU, a few minutes). With --data DIR: an ImageFolder/ImageNet layout (DIR/train, DIR/val) "
                    "with the published ImageNet-1K recipe. Several GPUs or nodes: start with torchrun.")
    p.add_argument("--config", "-c", metavar="YAML", help="recipe file (see configs/); flags override it")
    p.add_argument("--resume", metavar="auto|FILE",
                   help="'auto': continue from the latest checkpoint in --output (fresh start if none); "
                        "or a checkpoint file")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    add_config_flags(p)
    p.set_defaults(func=train_command)

    e = subparsers.add_parser("eval", help="top-1/top-5 accuracy of a checkpoint on a validation set")
    e.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="ours (.pt / .safetensors) or a published checkpoint (.pth, wrapped or EMA dicts)")
    e.add_argument("--model", help="model name (default: the one stored in our checkpoints)")
    e.add_argument("--data", default=None,
                   help="'digits' or a folder: DIR/val (or DIR/validation) if present, else DIR's class folders "
                        "(default: the training data stored in our checkpoints)")
    _add_eval_options(e)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.set_defaults(func=eval_command)

    q = subparsers.add_parser("predict", help="top-5 labels of images")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("--checkpoint", required=True, metavar="FILE")
    q.add_argument("--model", help="model name (default: the one stored in our checkpoints)")
    q.add_argument("--topk", type=int, default=5)
    q.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    _add_eval_options(q)
    q.add_argument("--json", action="store_true", help="print one JSON object per image")
    q.set_defaults(func=predict_command)


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=None, help="default: stored in the checkpoint, else 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: stored, else 0.875")
    p.add_argument("--interpolation", default=None, help="default: stored, else bicubic")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override for checkpoints that do not store theirs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")


# -- train ---------------------------------------------------------------------------------------------
def train_command(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from ..data import DataError
    from .engine import TrainingDiverged, cleanup_distributed, train

    yaml_values = load_yaml(args.config) if args.config else {}
    cfg = build_config(yaml_values, flags_to_values(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        raise CommandError(f"{exc}. Lower the learning rate or enable --clip-grad") from None
    except DataError as exc:  # from a DataLoader worker the message holds the worker's traceback
        raise CommandError(_worker_message(exc)) from None
    finally:
        cleanup_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        ema = f", EMA top-1 {result.ema_top1:.2f}%" if result.ema_top1 is not None else ""
        print(f"done: val top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%{ema} (best {result.best_top1:.2f}%) "
              f"in {result.seconds:.1f}s ({result.images_per_second:.0f} img/s); "
              f"checkpoints and model.safetensors in {result.out_dir}")
    return 0


def _worker_message(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    marker = "DataError: "
    return last.split(marker, 1)[1] if marker in last else last


# -- shared loading for eval / predict -----------------------------------------------------------------
def _load_for_inference(args: argparse.Namespace, use_ema: bool) -> tuple[Any, dict[str, Any], Any]:
    """(model in eval mode on the device, metadata, the loaded checkpoint object)."""
    import torch

    from ..models import load_checkpoint
    from ..models.checkpoint import CheckpointError, remap_keys, unwrap_state_dict
    from .checkpointing import read_checkpoint_with_meta
    from .config import parse_model_args
    from .engine import build_model, is_vmamba, state_dict_num_classes

    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    obj, meta = read_checkpoint_with_meta(args.checkpoint)
    stored_name = meta.get("model_name")
    name = args.model or stored_name
    if not name:
        raise ValueError(f"{args.checkpoint} does not say which model it holds; pass --model NAME")
    model_args = dict(meta.get("model_args") or {}) if name == stored_name else {}
    model_args.update(parse_model_args(args.model_arg))
    state = remap_keys(unwrap_state_dict(obj, use_ema=use_ema))
    num_classes = state_dict_num_classes(state) or len(meta.get("class_names") or []) or 1000
    model = build_model(name, num_classes, model_args, drop_path=None)
    if is_vmamba(model):
        load_checkpoint(model, obj, strict=True, use_ema=use_ema)
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint does not match {name}: {str(exc).splitlines()[0]}") from None
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model.to(device).eval()
    return model, meta, obj


def _eval_transform(args: argparse.Namespace, meta: dict[str, Any]):
    from ..data import build_eval_transform
    from .config import IMAGENET_MEAN, IMAGENET_STD

    cfg = meta.get("config") or {}
    size = args.img_size or cfg.get("img_size") or 224
    crop = args.crop_pct or cfg.get("crop_pct") or 0.875
    interp = args.interpolation or cfg.get("interpolation") or "bicubic"
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    return build_eval_transform(int(size), interpolation=interp, crop_pct=float(crop), mean=mean, std=std), cfg


# -- eval ----------------------------------------------------------------------------------------------
def eval_command(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..data import CheckedImageFolder, DigitsDataset
    from .engine import evaluate

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    model, meta, obj = _load_for_inference(args, use_ema=False)
    transform, cfg = _eval_transform(args, meta)
    data = args.data or cfg.get("data")
    if not data:
        raise ValueError("pass --data DIR (or 'digits')")
    if data == "digits":
        dataset = DigitsDataset("val", transform, val_fraction=float(cfg.get("val_fraction", 0.2)))
        classes = list(DigitsDataset.classes)
    else:
        root = Path(data)
        for name in ("val", "validation"):
            if (root / name).is_dir():
                root = root / name
                break
        dataset = CheckedImageFolder(root, transform, what="evaluation data")
        classes = list(dataset.classes)
    stored = meta.get("class_names")
    if stored and list(stored) != classes and model.num_classes == len(stored):
        raise ValueError(f"the class folders of {data} ({len(classes)}) differ from the {len(stored)} classes the "
                         "checkpoint was trained on")
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    results = {"model": meta.get("model_name") or args.model, "checkpoint": str(args.checkpoint),
               "images": len(dataset)}
    main = evaluate(model, loader, device)
    results.update(top1=round(main["top1"], 4), top5=round(main["top5"], 4), loss=round(main["loss"], 6))
    if isinstance(obj, dict) and isinstance(obj.get("model_ema"), dict) and obj["model_ema"]:
        ema_model, _, _ = _load_for_inference(args, use_ema=True)
        ema = evaluate(ema_model, loader, device)
        results.update(ema_top1=round(ema["top1"], 4), ema_top5=round(ema["top5"], 4))
    if args.json:
        print(json.dumps(results))
    else:
        line = f"{results['model']} on {data} ({len(dataset)} images): top-1 {results['top1']:.2f}%, " \
               f"top-5 {results['top5']:.2f}%"
        if "ema_top1" in results:
            line += f"; EMA top-1 {results['ema_top1']:.2f}%, top-5 {results['ema_top5']:.2f}%"
        print(line)
    return 0


# -- predict -------------------------------------------------------------------------------------------
def _class_names(meta: dict[str, Any], num_classes: int) -> list[str]:
    stored = meta.get("class_names")
    if stored and len(stored) == num_classes:
        return [str(c) for c in stored]
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i) for i in range(1000)]
        except Exception:  # pragma: no cover - older timm
            pass
    return [str(i) for i in range(num_classes)]


def predict_command(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_rgb

    if args.topk <= 0:
        raise ValueError(f"--topk must be positive, got {args.topk}")
    for path in args.images:
        if not Path(path).is_file():
            raise ValueError(f"image not found: {path}")
    model, meta, _ = _load_for_inference(args, use_ema=args.ema)
    transform, _ = _eval_transform(args, meta)
    names = _class_names(meta, model.num_classes)
    device = next(model.parameters()).device
    images = [transform(load_rgb(path)) for path in args.images]  # DataError names an unreadable file
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack(images).to(device)).float(), dim=1).cpu()
    k = min(args.topk, probs.shape[1])
    for path, p in zip(args.images, probs):
        values, indices = p.topk(k)
        top = [(names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
        if args.json:
            print(json.dumps({"image": str(path), "top": [{"label": n, "prob": round(v, 6)} for n, v in top]}))
        else:
            print(path)
            for label, prob in top:
                print(f"  {prob:7.2%}  {label}")
    sys.stdout.flush()
    return 0

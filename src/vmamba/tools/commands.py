"""``vmamba convert`` and ``vmamba export`` subcommands."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path
from typing import Any

TOLERANCE = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a published .pth checkpoint to safetensors, without running its pickle",
        description="Read a training checkpoint (e.g. one published by the VMamba authors) with a restricted "
                    "unpickler that never runs code from the file, take its 'model' (or 'model_ema') weights, "
                    "rename old keys, check them against the model and write safetensors.")
    convert.add_argument("input", type=Path, help="checkpoint (.pth / .pt / .safetensors)")
    convert.add_argument("output", type=Path, help="output .safetensors file")
    convert.add_argument("--ema", action="store_true", help="take the EMA weights ('model_ema')")
    convert.add_argument("--model", default=None, help="architecture to check against (default: detect)")
    convert.set_defaults(func=run_convert)

    export = subparsers.add_parser(
        "export", help="export a model to ONNX or a torch.export program (dynamic batch)",
        description="Export with a dynamic batch dimension. The selective scan is written as plain tensor "
                    "operations, so the result runs without vmamba's custom op or GPU kernels.")
    export.add_argument("output", type=Path, help="output file (.onnx for onnx, .pt2 for torch.export)")
    export.add_argument("--model", required=True, help="registered model name (see `vmamba models`)")
    export.add_argument("--checkpoint", type=Path, default=None,
                        help="weights: safetensors or weights-only .pth (convert published files first)")
    export.add_argument("--ema", action="store_true", help="take the EMA weights of the checkpoint")
    export.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    export.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: from the checkpoint, else 1000)")
    export.add_argument("--features-only", action="store_true", help="export the multi-scale backbone")
    export.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N",
                        help="input height [width] (fixed; only the batch is dynamic)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size to 2")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    export.add_argument("--keep-scan-op", action="store_true",
                        help="torch-export: keep the vmamba::selective_scan custom op (needs vmamba to load)")
    export.add_argument("--no-verify", action="store_true",
                        help="skip comparing onnxruntime with PyTorch at batch sizes 1 and 3")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration field, e.g. --set depths=(1,1,1,1)")
    export.set_defaults(func=run_export)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    report = convert_checkpoint(args.input, args.output, model_name=args.model, use_ema=args.ema)
    kind = f"backbone, out_indices {report.out_indices}" if report.features_only else \
        f"{report.num_classes} classes"
    print(f"{args.input} -> {args.output}: {report.model} ({kind}), {report.tensors} tensors, "
          f"{report.parameters / 1e6:.2f}M parameters, weights '{report.weights}'")
    if report.ignored_objects:
        print(f"ignored pickled objects (not executed): {', '.join(report.ignored_objects)}")
    return 0


def _build_model(args: argparse.Namespace):
    from .. import create_model
    from ..models import read_state_dict_file

    overrides = _parse_overrides(args.overrides)
    num_classes = args.num_classes
    if args.checkpoint is not None and num_classes is None and not args.features_only:
        state_dict = read_state_dict_file(args.checkpoint, use_ema=args.ema)
        head = next((v for k, v in state_dict.items() if k.endswith("head.weight")), None)
        num_classes = int(head.shape[0]) if head is not None else 0
    if args.features_only:
        return create_model(args.model, features_only=True, checkpoint_path=args.checkpoint, use_ema=args.ema,
                            **overrides)
    return create_model(args.model, num_classes=num_classes, checkpoint_path=args.checkpoint, use_ema=args.ema,
                        **overrides)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .export import _example, export_onnx, export_program, save_program, verify_onnx

    if len(args.img_size) > 2:
        raise ValueError("--img-size takes one or two numbers")
    size = tuple(args.img_size) if len(args.img_size) == 2 else (args.img_size[0],) * 2
    model = _build_model(args).eval()
    example = _example(model, 2, size)
    if args.format == "onnx":
        if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
            raise ValueError("ONNX export needs the onnx and onnxscript packages: pip install 'vmamba[export]'")
        path = export_onnx(model, args.output, example=example, dynamic_batch=not args.static_batch,
                           opset=args.opset)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), input 'images' "
              f"({'batch' if not args.static_batch else 2}, {model.in_chans}, {size[0]}, {size[1]})")
        if args.no_verify:
            return 0
        if importlib.util.find_spec("onnxruntime") is None:
            print("onnxruntime not installed: output not verified")
            return 0
        batches = [_example(model, b, size) for b in ((1, 3) if not args.static_batch else (2,))]
        errors = verify_onnx(model, path, batches)
        worst = max(errors)
        print("onnxruntime vs PyTorch, max relative error: " +
              ", ".join(f"batch {b.shape[0]}: {e:.2e}" for b, e in zip(batches, errors)))
        if worst > TOLERANCE:
            print(f"error: relative error {worst:.2e} above {TOLERANCE:g}")
            return 1
        return 0
    program = export_program(model, example, dynamic_batch=not args.static_batch, decompose=not args.keep_scan_op)
    path = save_program(program, args.output)
    with torch.no_grad():
        check = torch.export.load(str(path)).module()(example)
        expected = model(example)
    if isinstance(expected, (list, tuple)):
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(check, expected))
    else:
        ok = torch.allclose(check, expected, rtol=1e-4, atol=1e-5)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); reloaded program matches eager: {ok}")
    return 0 if ok else 1

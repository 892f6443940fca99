"""``vmamba bench | flops | erf | attn | ablate``: the analysis subcommands."""

from __future__ import annotations

import argparse

from ._common import format_table, parse_overrides, parse_sizes, split_list, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_flops(subparsers)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model option override, e.g. --opt scan_mode=bidi --opt d_state=4 (repeatable)")


# -- flops ---------------------------------------------------------------------------------------------
def _register_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="parameters and FLOPs (published fvcore convention) with a per-module breakdown",
                       description="Count parameters and FLOPs with torch.utils.flop_counter. The default "
                                   "'fvcore' convention matches the published numbers: one multiply-add = 1 FLOP, "
                                   "layer norm 5 per element, pooling 1 per element, the selective scan "
                                   "9*B*L*D*N + B*D*L, everything else free.")
    p.add_argument("models", nargs="+", help="VMamba model names (see `vmamba models`) and/or timm model names")
    p.add_argument("--img-size", nargs="+", default=["224"], help="input sizes, e.g. 224 512 or 256x192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--convention", choices=("fvcore", "torch"), default="fvcore",
                   help="fvcore: published numbers (MACs); torch: FlopCounterMode's own (2 per MAC, norms free)")
    p.add_argument("--scan", choices=("auto", "include", "exclude"), default="auto",
                   help="count the selective scan; auto follows the official counter (Mamba2 scan excluded)")
    p.add_argument("--backward", action="store_true", help="count forward + backward")
    p.add_argument("--depth", type=int, default=2, help="module depth of the breakdown (0: none)")
    p.add_argument("--cpu", action="store_true", help="count on real CPU tensors instead of the meta device")
    p.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    _add_model_options(p)
    p.set_defaults(func=run_flops)


def run_flops(args: argparse.Namespace) -> int:
    from .flops import count_model_flops

    overrides = parse_overrides(args.opt)
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    reports = []
    for name in split_list(args.models):
        for size in parse_sizes(args.img_size):
            reports.append(count_model_flops(name, size, args.batch, args.convention, args.scan, meta=not args.cpu,
                                             backward=args.backward, **overrides))
    for report in reports:
        if args.depth > 0:
            print(f"== {report.model} {report.input_shape}")
            print(format_table(report.module_rows(args.depth)))
            print(format_table([{"operator": k, "flops": v} for k, v in report.by_operator.items()]))
            print()
    rows = [{"model": r.model, "input": "x".join(map(str, r.input_shape)), "params": r.params,
             "params_M": r.params / 1e6, "flops": r.flops, "GFLOPs": r.gflops,
             "scan": "counted" if r.scan_counted else "excluded"} for r in reports]
    print(format_table(rows))
    if args.json:
        write_json(args.json, [r.to_dict() for r in reports])
    return 0

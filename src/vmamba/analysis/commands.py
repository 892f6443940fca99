"""``vmamba bench | flops | erf | attn | ablate``: the analysis subcommands."""

from __future__ import annotations

import argparse

from ._common import format_table, parse_overrides, parse_sizes, split_list, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_flops(subparsers)
    _register_attn(subparsers)
    _register_erf(subparsers)
    _register_bench(subparsers)
    _register_ablate(subparsers)


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
    p.add_argument("--backward", action="store_true",
                   help="count forward + backward (matmul/conv gradients, scan backward = 2x its forward; "
                        "norm backward is not counted)")
    p.add_argument("--depth", type=int, default=2, help="module depth of the breakdown (0: none)")
    p.add_argument("--where", choices=("meta", "fake", "cpu"), default="meta",
                   help="count on meta tensors (fastest), FakeTensorMode tensors, or real CPU tensors")
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
            reports.append(count_model_flops(name, size, args.batch, args.convention, args.scan, where=args.where,
                                             backward=args.backward, **overrides))
    for report in reports:
        if args.depth > 0:
            print(f"== {report.model} {report.input_shape}")
            print(format_table(report.module_rows(args.depth)))
            print(format_table([{"operator": k, "flops": v} for k, v in report.by_operator.items()]))
            print()
    rows = [{"model": r.model, "input": "x".join(map(str, r.input_shape)), "params": r.params,
             "params_M": r.params / 1e6, "flops": r.flops, "GFLOPs": r.gflops,
             "scan": r.scan_status} for r in reports]
    print(format_table(rows))
    if args.json:
        write_json(args.json, [r.to_dict() for r in reports])
    return 0


# -- attn ----------------------------------------------------------------------------------------------
def _register_attn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attn", help="the selective scan's implicit attention map of one pixel, overlaid on the image",
                       description="The scan is linear in its input for fixed delta, B, C: y = M u with "
                                   "M[i,j] = C_i (prod_{k=j+1..i} exp(delta_k A)) delta_j B_j. For one block and "
                                   "query pixel this sums the routes mapped back to 2D, reduces over channels, "
                                   "and overlays the map on the image. D (the skip term) is left out unless "
                                   "--include-d.")
    p.add_argument("model", help="a VMamba model name")
    p.add_argument("--checkpoint", help="weights to load (safetensors or .pth)")
    p.add_argument("--image", help="input image (default: random noise)")
    p.add_argument("--img-size", default="224", help="input size, e.g. 224 or 256x192")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--block", type=int, default=-1, help="block index in the stage (negative counts from the end)")
    p.add_argument("--query", help="query pixel H,W in the stage's grid (default: the centre)")
    p.add_argument("--include-d", action="store_true", help="add the skip term D on the diagonal")
    p.add_argument("--reduce", choices=("absmean", "mean", "sum", "abssum"), default="absmean",
                   help="how the per-channel maps are combined")
    p.add_argument("--full", action="store_true", help="also compute the full LxL matrix (small maps only)")
    p.add_argument("--max-pixels", type=int, default=4096, help="largest map for --full")
    p.add_argument("--out", help="PNG path (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write the map and summary as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    _add_model_options(p)
    p.set_defaults(func=run_attn)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


def _parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"{what} must be two integers H,W, got {text!r}") from None
    return a, b


def run_attn(args: argparse.Namespace) -> int:
    import torch

    from ._common import build_model, is_vmamba_model, load_image
    from .attn import attention_map, plot_attention

    if not is_vmamba_model(args.model):
        raise ValueError(f"attn needs a VMamba model (see `vmamba models`), got {args.model!r}")
    size = parse_sizes(args.img_size)[0]
    torch.manual_seed(args.seed)
    model = build_model(args.model, checkpoint=args.checkpoint, **parse_overrides(args.opt)).to(_device(args.device))
    image = load_image(args.image, size) if args.image else torch.randn(3, *size)
    result = attention_map(model, image, args.stage, args.block, _parse_pair(args.query, "--query"),
                           args.include_d, args.reduce, args.full, args.max_pixels)
    summary = result.summary()
    print(format_table([summary]))
    if args.out:
        plot_attention(result, args.out)
        print(f"wrote {args.out}")
    if args.json:
        data = dict(summary, map=result.map.tolist(), route_maps=result.route_maps.tolist())
        if result.full is not None:
            data["full"] = result.full.tolist()
        write_json(args.json, data)
    return 0


# -- erf -----------------------------------------------------------------------------------------------
def _register_erf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("erf", help="effective receptive field maps (ours and timm models) with area ratios",
                       description="Gradient of the central last-stage output w.r.t. the input, |.| summed over "
                                   "colour channels and N images (a folder, or random inputs), log-scaled "
                                   "log10(1+x)/max for the PNG; prints the image fraction of the smallest centred "
                                   "square (and of the fewest pixels) holding 20/50/99%% of the mass.")
    p.add_argument("models", nargs="+", help="VMamba and/or timm model names (e.g. resnet50 convnext_tiny "
                                             "swin_tiny_patch4_window7_224 deit_small_patch16_224)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="weights for a model (NAME=PATH when several models are given); random init otherwise")
    p.add_argument("--images", metavar="FOLDER", help="image folder (default: random N(0,1) inputs)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", default="224", help="input size, e.g. 224 or 512")
    p.add_argument("--target", choices=("relu", "sum"), default="relu",
                   help="central output summed over channels after ReLU (RepLKNet) or as is")
    p.add_argument("--grad", choices=("abs", "relu"), default="abs", help="how the input gradient is made positive")
    p.add_argument("--scale", choices=("log1p", "log"), default="log1p",
                   help="display scaling: log10(1+x)/max (RepLKNet) or log10(x/max) over 4 decades")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG grid path (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write the area ratios as JSON")
    p.add_argument("--save-maps", metavar="PATH", help="torch.save the raw and scaled maps to PATH")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    _add_model_options(p)
    p.set_defaults(func=run_erf)


def run_erf(args: argparse.Namespace) -> int:
    import torch

    from ._common import build_model, is_vmamba_model, parse_checkpoints
    from .erf import compute_erf, plot_erf

    names = split_list(args.models)
    checkpoints = parse_checkpoints(args.checkpoint, names)
    overrides = parse_overrides(args.opt)
    size = parse_sizes(args.img_size)[0]
    results = []
    for name in names:
        torch.manual_seed(args.seed)
        extra = overrides if is_vmamba_model(name) else {}
        model = build_model(name, checkpoint=checkpoints.get(name), img_size=size, **extra).to(_device(args.device))
        results.append(compute_erf(model, size, args.num_images, args.batch_size, args.images, args.seed,
                                   args.target, args.grad, args.scale))
    rows = [r.summary() for r in results]
    print(format_table(rows, ["model", "images", "size", "square20", "square50", "square99", "pixels20",
                              "pixels50", "pixels99"]))
    if args.out:
        plot_erf(results, args.out)
        print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, rows)
    if args.save_maps:
        torch.save({r.model: {"raw": r.raw, "scaled": r.scaled} for r in results}, args.save_maps)
    return 0


# -- bench ---------------------------------------------------------------------------------------------
def _add_bench_options(p: argparse.ArgumentParser, batch: int = 32, warmup: int = 5, iters: int = 20) -> None:
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--img-size", nargs="+", default=["224"],
                   help="one or more input sizes (a resolution sweep), e.g. 224 384 512 768 1024")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="allow TF32 (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead (replays CUDA graphs: no launch "
                        "overhead), max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the eager step once as a CUDA graph and replay it: no per-kernel host cost "
                        "(CUDA; training replays forward and backward, the loss and optimizer stay eager)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference / training-step throughput and peak memory, ours and timm side by side",
                       description="Throughput (images/s) and peak memory of inference and training steps, for "
                                   "VMamba models and any timm models, over one or more input sizes.")
    p.add_argument("models", nargs="+", help="VMamba and/or timm model names")
    p.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    _add_bench_options(p)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP column")
    p.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    p.add_argument("--plot", metavar="PNG", help="images/s vs resolution plot (needs matplotlib)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH")
    _add_model_options(p)
    p.set_defaults(func=run_bench)


def _bench_settings(args: argparse.Namespace, modes: tuple[str, ...], with_flops: bool = True):
    import torch

    from .bench import BenchSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    return BenchSettings(batch_size=args.batch_size, dtype=args.dtype, tf32=args.tf32,
                         channels_last=args.channels_last, compile=args.compile,
                         compile_backend=args.compile_backend, compile_mode=args.compile_mode,
                         cuda_graph=args.cuda_graph, warmup=args.warmup, iters=args.iters,
                         device=args.device, modes=modes, with_flops=with_flops)


BENCH_COLUMNS = ["model", "size", "mode", "batch", "img_per_s", "ms_per_iter", "peak_mem_mb", "peak_rss_mb",
                 "params_M", "GFLOPs", "status"]


def run_bench(args: argparse.Namespace) -> int:
    import sys

    from ._common import parse_checkpoints
    from .bench import bench_models, environment, plot_throughput

    names = split_list(args.models)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    settings = _bench_settings(args, modes, not args.no_flops)
    sizes = parse_sizes(args.img_size)
    checkpoints = parse_checkpoints(args.checkpoint, names)
    env = environment(settings)
    print(f"# bench on {env['device']} ({env.get('gpu', env.get('cpu'))}), torch {env['torch']}, "
          f"dtype {settings.dtype}, tf32 {settings.tf32}, channels_last {settings.channels_last}, "
          f"compile {settings.compile}, batch {settings.batch_size}, warmup {settings.warmup}, iters {settings.iters}",
          file=sys.stderr)
    rows = bench_models(names, sizes, settings, parse_overrides(args.opt), checkpoints,
                        log=lambda msg: print(msg, file=sys.stderr))
    columns = [c for c in BENCH_COLUMNS if any(c in r for r in rows)]
    print(format_table(rows, columns))
    if args.json:
        write_json(args.json, {"environment": env, "rows": rows})
    if args.plot:
        plot_throughput(rows, args.plot, f"({env['device']}, batch {settings.batch_size}, {settings.dtype})")
        print(f"wrote {args.plot}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


# -- ablate --------------------------------------------------------------------------------------------
def _register_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="compare scan modes (cross2d/bidi/unidi/cascade2d): params, FLOPs, speed, ERF",
                       description="Build one VMamba architecture with each scan mode and compare parameters, "
                                   "FLOPs, throughput and the effective receptive field.")
    p.add_argument("model", help="a VMamba model name")
    p.add_argument("--modes", nargs="+", default=["cross2d", "bidi", "unidi", "cascade2d"])
    p.add_argument("--mode", choices=("infer", "train", "both", "none"), default="infer",
                   help="what to time (none: no timing)")
    _add_bench_options(p, batch=8, warmup=2, iters=5)
    p.add_argument("--erf-images", type=int, default=4, help="images for the ERF (0: skip)")
    p.add_argument("--erf-batch", type=int, default=2)
    p.add_argument("--images", metavar="FOLDER", help="image folder for the ERF (default: random inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="ERF grid PNG, one panel per scan mode (needs matplotlib)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODE=PATH",
                   help="trained weights for one scan mode (repeatable)")
    p.add_argument("--independent-init", action="store_true",
                   help="do not share random weights between the variants (by default every variant gets the "
                        "first one's weights, per-route tensors truncated to its routes)")
    _add_model_options(p)
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    import sys

    from .ablate import ablate_scan_modes
    from .erf import plot_erf

    sizes = parse_sizes(args.img_size)
    if len(sizes) != 1:
        raise ValueError("ablate takes one --img-size")
    modes = split_list(args.modes)
    settings = None
    if args.mode != "none":
        settings = _bench_settings(args, ("infer", "train") if args.mode == "both" else (args.mode,), False)
    from ._common import parse_checkpoints

    checkpoints = parse_checkpoints(args.checkpoint, modes) if args.checkpoint else {}
    rows, erfs = ablate_scan_modes(args.model, modes, sizes[0], settings, args.erf_images, args.erf_batch,
                                   args.images, args.seed, parse_overrides(args.opt),
                                   log=lambda msg: print(msg, file=sys.stderr),
                                   share_weights=not args.independent_init, checkpoints=checkpoints)
    print(format_table(rows))
    if args.out and erfs:
        plot_erf(erfs, args.out)
        print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, rows)
    return 0

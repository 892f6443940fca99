"""Reproduce the paper's analysis figures on the current machine (a GPU is best).

    python benchmarks/analysis_paper_figures.py --out results/analysis [--quick] [--images FOLDER]

1. FLOPs and parameters of every registered model at 224x224 (published convention), against the
   reference model card when it is found (../shared/reference/model_card.tsv or $VMAMBA_REFERENCE).
2. Resolution sweep 224 -> 1024: inference and training throughput of VMamba-T/S/B next to
   timm baselines, with a PNG (images/s vs resolution).
3. ERF of VMamba and the baselines (random weights unless checkpoints are given with
   --checkpoint NAME=PATH), PNG grid + area ratios.
4. Scan-mode ablation of VMamba-T (cross2d / bidi / unidi / cascade2d).

Everything goes to --out as JSON and PNG files; a summary is printed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import vmamba
from vmamba.analysis._common import build_model, format_table, parse_checkpoints, write_json
from vmamba.analysis.ablate import ablate_scan_modes
from vmamba.analysis.bench import BenchSettings, bench_models, environment, plot_throughput
from vmamba.analysis.erf import compute_erf, plot_erf
from vmamba.analysis.flops import count_model_flops

OURS = ["vmamba_tiny_s1l8", "vmamba_small_s1l20", "vmamba_base_s1l20"]
BASELINES = ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "deit_small_patch16_224"]


def _card() -> dict[str, int]:
    root = Path(os.environ.get("VMAMBA_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
    path = root / "model_card.tsv"
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    return {r["name"]: int(r["flops_224"]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/analysis")
    parser.add_argument("--quick", action="store_true", help="small sizes and few iterations (smoke run)")
    parser.add_argument("--images", help="image folder for the ERF")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    card = _card()
    flop_rows = []
    for name in vmamba.list_models():
        report = count_model_flops(name, 224)
        expected = card.get(name)
        flop_rows.append({"model": name, "params": report.params, "flops": report.flops, "card": expected,
                          "rel_diff": None if expected is None else (report.flops - expected) / expected})
    print(format_table(flop_rows))
    write_json(out / "flops.json", flop_rows)

    sizes = [(s, s) for s in ((64, 96) if args.quick else (224, 384, 512, 640, 768, 1024))]
    settings = BenchSettings(batch_size=2 if args.quick else 32, dtype=args.dtype, warmup=1 if args.quick else 10,
                             iters=1 if args.quick else 30)
    models = OURS[:1] + BASELINES[:1] if args.quick else OURS + BASELINES
    rows = bench_models(models, sizes, settings)
    print(format_table(rows))
    write_json(out / "bench.json", {"environment": environment(settings), "rows": rows})
    plot_throughput(rows, str(out / "throughput_vs_resolution.png"))

    names = OURS[:1] + BASELINES
    checkpoints = parse_checkpoints(args.checkpoint, names)
    size = (64, 64) if args.quick else (1024, 1024)
    results = []
    for name in names:
        model = build_model(name, checkpoint=checkpoints.get(name), img_size=size)
        if torch.cuda.is_available():
            model = model.cuda()
        results.append(compute_erf(model, size, 2 if args.quick else 50, 1 if args.quick else 4, args.images))
    print(format_table([r.summary() for r in results]))
    write_json(out / "erf.json", [r.summary() for r in results])
    plot_erf(results, str(out / "erf.png"))

    abl_settings = BenchSettings(batch_size=2 if args.quick else 32, dtype=args.dtype, warmup=1 if args.quick else 5,
                                 iters=1 if args.quick else 20, modes=("infer",))
    abl_rows, erfs = ablate_scan_modes(OURS[0], size=(64, 64) if args.quick else (224, 224), settings=abl_settings,
                                       erf_images=2 if args.quick else 16)
    print(format_table(abl_rows))
    write_json(out / "ablation.json", abl_rows)
    plot_erf(erfs, str(out / "ablation_erf.png"))


if __name__ == "__main__":
    main()

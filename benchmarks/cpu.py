"""CPU speed of VMamba-T against timm's Swin-T and ConvNeXt-T, measured side by side in one run.

fp32, 224x224: inference at batch 1 and 8, one training step (forward + cross-entropy + backward,
no optimizer) at batch 8. Each figure is the median of ``--iters`` timed runs after ``--warmup``
untimed ones. Writes a Markdown table to stdout and, with ``--write``, into BENCHMARKS.md.

    python benchmarks/cpu.py --write
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vmamba

MODELS = ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224", "convnext_tiny")
BASELINE = "swin_tiny_patch4_window7_224"
BEGIN, END = "<!-- cpu-benchmark:begin -->", "<!-- cpu-benchmark:end -->"


def build(name: str) -> torch.nn.Module:
    if name in vmamba.list_models():
        return vmamba.create_model(name)
    return timm.create_model(name)


def median_seconds(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, warmup: int, iters: int, size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(name)
    results = {}
    model.eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            results[f"infer_b{batch}"] = median_seconds(lambda x=x: model(x), warmup, iters)
    model.train()
    x = torch.randn(8, 3, size, size)
    target = torch.randint(0, 1000, (8,))

    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()

    results["train_b8"] = median_seconds(train_step, max(1, warmup // 2), max(2, iters // 2))
    return results


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    base = results[BASELINE]
    lines = [
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}; fp32, "
        f"{args.size}x{args.size}, median of {args.iters} timed runs after {args.warmup} warm-up runs "
        f"(training: median of {max(2, args.iters // 2)}); training step = forward + cross-entropy + backward.",
        "",
        "| model | infer b1 (s) | × Swin-T | infer b8 (s) | × Swin-T | train step b8 (s) | × Swin-T |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = []
        for key in ("infer_b1", "infer_b8", "train_b8"):
            cells += [f"{r[key]:.3f}", f"{r[key] / base[key]:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content:
        head, rest = content.split(BEGIN, 1)
        content = head + block + rest.split(END, 1)[1]
    else:
        content = content.rstrip() + "\n\n## CPU (benchmarks/cpu.py)\n\n" + block + "\n"
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="update the CPU section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if BASELINE not in args.models:
        args.models.append(BASELINE)
    results = {name: measure(name, args.warmup, args.iters, args.size) for name in args.models}
    text = table(results, args)
    print(text)
    if args.write:
        write_section(text, Path(__file__).resolve().parent.parent / "BENCHMARKS.md")


if __name__ == "__main__":
    main()

"""Inference throughput against input resolution: VMamba-T vs Swin-T on a CUDA device.

    PYTHONPATH=src python benchmarks/gpu_scaling.py [--sizes 224,384,512,768,1024]

Batch at each size holds about 128·224² pixels (at least 1 image); bf16 autocast, channels_last,
cudnn.benchmark on; warm-up then CUDA-event-timed iterations. Swin is built by timm for each size
(``img_size``), with its windows padded where the feature map is not a multiple of 7.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from cuda_timing import timed

PAIRS = ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224")


def build(name, size):
    if name.startswith("vmamba"):
        import vmamba

        return vmamba.create_model(name)
    import timm

    return timm.create_model(name, img_size=size)


def images_per_second(model, batch, size, warmup=2, iters=6):
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return batch * 1000 / timed(lambda: model(x), warmup, iters)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="224,384,512,768,1024")
    parser.add_argument("--out", default="gpu_scaling.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        batch = max(1, round(128 * 224**2 / size**2))
        row = {"size": size, "batch": batch}
        for name in PAIRS:
            try:
                model = build(name, size).cuda().eval().to(memory_format=torch.channels_last)
                row[name] = images_per_second(model, batch, size)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other sizes
                row[name] = f"{type(exc).__name__}: {exc}"[:200]
            torch.cuda.empty_cache()
        if all(isinstance(row[n], float) for n in PAIRS):
            row["ratio"] = row[PAIRS[0]] / row[PAIRS[1]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

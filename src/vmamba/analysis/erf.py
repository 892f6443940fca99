"""Effective receptive field (ERF): how much each input pixel influences the central output position.

For each image x the target is the central position of the last stage's feature map, summed over
channels (``target="relu"``: of its positive part, as in the RepLKNet ERF analysis the VMamba paper
follows). The map is |∂ target / ∂ x| summed over the colour channels, accumulated (summed) over N
images. For display it is log-scaled as log10(1 + map) and divided by its maximum (or, with
``scale="log"``, log10(map / max) over four decades).

Area numbers: the fraction of the image covered by the smallest centred square that holds t of the
total gradient mass (``square``), and the fraction of pixels needed when taking the largest first
(``pixels``), for t = 20 %, 50 %, 99 %. Both are computed on the raw accumulated map; the same on
the log-scaled map (the RepLKNet convention) is also reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._common import feature_map, list_images, load_image

THRESHOLDS = (0.2, 0.5, 0.99)


def input_batches(size: tuple[int, int], num_images: int, batch_size: int, folder: str | None = None,
                  seed: int = 0, in_chans: int = 3) -> Iterator[Tensor]:
    """Batches of normalised images from ``folder`` (first ``num_images``) or of N(0, 1) noise."""
    if num_images < 1 or batch_size < 1:
        raise ValueError("the number of images and the batch size must be >= 1")
    if folder is not None:
        files = list_images(folder, num_images)
        for start in range(0, len(files), batch_size):
            yield torch.stack([load_image(f, size) for f in files[start:start + batch_size]])
        return
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < num_images:
        count = min(batch_size, num_images - done)
        yield torch.randn(count, in_chans, *size, generator=generator)
        done += count


def input_gradient_map(model: nn.Module, batches: Iterable[Tensor], target: str = "relu",
                       grad: str = "abs") -> tuple[Tensor, int]:
    """Accumulated |gradient| of the central last-stage output w.r.t. the input: ((H, W) float64, N)."""
    if target not in ("relu", "sum"):
        raise ValueError(f"unknown ERF target {target!r}; choose relu or sum")
    if grad not in ("abs", "relu"):
        raise ValueError(f"unknown gradient reduction {grad!r}; choose abs or relu")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total: Tensor | None = None
    count = 0
    try:
        for x in batches:
            x = x.to(device).requires_grad_(True)
            features = feature_map(model, x)
            h, w = features.shape[2], features.shape[3]
            centre = features[:, :, h // 2, w // 2]
            value = (torch.relu(centre) if target == "relu" else centre).float().sum()
            (g,) = torch.autograd.grad(value, x)
            g = g.abs() if grad == "abs" else torch.relu(g)
            part = g.double().sum(dim=(0, 1)).cpu()
            total = part if total is None else total + part
            count += x.shape[0]
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("no input images")
    return total, count


SCALES = ("log1p", "log")


def log_scale(erf: Tensor, scale: str = "log1p", floor: float = 1e-4) -> Tensor:
    """The display map in [0, 1].

    ``log1p``: log10(1 + map) divided by its maximum (RepLKNet; close to linear when the gradients
    are small). ``log``: log10(map / max) clipped at ``floor`` and mapped linearly from
    [log10(floor), 0] to [0, 1], which shows the tails too.
    """
    data = erf.double().clamp_min(0)
    if scale == "log1p":
        scaled = torch.log10(data + 1)
        top = scaled.max()
        return scaled / top if top > 0 else scaled
    if scale == "log":
        top = data.max()
        if top <= 0:
            return data
        low = torch.log10(torch.tensor(floor, dtype=torch.float64))
        return ((torch.log10((data / top).clamp_min(floor)) - low) / -low).clamp(0, 1)
    raise ValueError(f"unknown ERF scale {scale!r}; choose one of {', '.join(SCALES)}")


def square_area_ratio(erf: Tensor, threshold: float) -> float:
    """Fraction of the image covered by the smallest centred square holding ``threshold`` of the mass."""
    data = erf.double().clamp_min(0)
    height, width = data.shape
    total = data.sum()
    if total <= 0:
        return float("nan")
    cum = torch.zeros(height + 1, width + 1, dtype=torch.float64)
    cum[1:, 1:] = data.cumsum(0).cumsum(1)
    for side in range(1, max(height, width) + 1):
        sh, sw = min(side, height), min(side, width)
        top, left = (height - sh) // 2, (width - sw) // 2
        mass = cum[top + sh, left + sw] - cum[top, left + sw] - cum[top + sh, left] + cum[top, left]
        if mass >= threshold * total * (1 - 1e-12):
            return sh * sw / (height * width)
    return 1.0


def pixel_area_ratio(erf: Tensor, threshold: float) -> float:
    """Fraction of pixels needed, taking the largest first, to hold ``threshold`` of the mass."""
    values = erf.double().clamp_min(0).flatten().sort(descending=True).values
    total = values.sum()
    if total <= 0:
        return float("nan")
    cum = values.cumsum(0)
    needed = int(torch.searchsorted(cum, threshold * total * (1 - 1e-12)).item()) + 1
    return min(needed, values.numel()) / values.numel()


def area_ratios(erf: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    out = {}
    for t in thresholds:
        pct = f"{t * 100:g}"
        out[f"square{pct}"] = square_area_ratio(erf, t)
        out[f"pixels{pct}"] = pixel_area_ratio(erf, t)
    return out


@dataclasses.dataclass
class ErfResult:
    model: str
    images: int
    size: tuple[int, int]
    raw: Tensor  # accumulated |gradient| (H, W)
    scaled: Tensor  # log10(1 + raw) / max

    def summary(self, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
        raw = area_ratios(self.raw, thresholds)
        logged = {f"log_{k}": v for k, v in area_ratios(self.scaled, thresholds).items()}
        return {"model": self.model, "images": self.images, "size": "x".join(map(str, self.size)), **raw, **logged}


def compute_erf(model: nn.Module, size: tuple[int, int] = (224, 224), num_images: int = 8, batch_size: int = 4,
                folder: str | None = None, seed: int = 0, target: str = "relu", grad: str = "abs",
                scale: str = "log1p") -> ErfResult:
    """The ERF of ``model`` over ``num_images`` images (from ``folder``, else random)."""
    in_chans = int(getattr(model, "in_chans", 3))
    batches = input_batches(size, num_images, batch_size, folder, seed, in_chans)
    raw, count = input_gradient_map(model, batches, target, grad)
    name = getattr(model, "model_name", None) or type(model).__name__
    return ErfResult(model=str(name), images=count, size=tuple(size), raw=raw, scaled=log_scale(raw, scale))


def plot_erf(results: Sequence[ErfResult], path: str, columns: int = 4,
             thresholds: Sequence[float] = THRESHOLDS) -> None:
    """PNG grid of the log-scaled ERF maps, titled with the 20/50/99 % centred-square areas."""
    from ._common import require_matplotlib

    plt = require_matplotlib()
    count = len(results)
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, res in zip(axes.flat, results):
        image = ax.imshow(res.scaled.numpy(), cmap="RdYlGn", vmin=0, vmax=1)
        areas = ", ".join(f"{square_area_ratio(res.raw, t) * 100:.1f}%" for t in thresholds)
        ax.set_title(f"{res.model}\nsquare area {'/'.join(f'{t * 100:g}' for t in thresholds)}%: {areas}",
                     fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

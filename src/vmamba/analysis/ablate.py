"""Scan-mode ablation: one architecture built with each 2D route scheme, compared side by side.

Modes (``SS2DConfig.scan_mode``): ``cross2d`` (4 routes: rows, columns, both reversed), ``bidi``
(rows both ways), ``unidi`` (rows forward only) and ``cascade2d`` (rows both ways, then columns of
that result both ways). The number of routes changes the per-route parameters (x_proj, Δ, A, D), so
parameters and FLOPs differ a little; throughput and the ERF show the rest.

With random weights, ``share_weights=True`` (the default) makes the variants comparable: every
parameter is copied from the first variant, and per-route parameters (leading route dimension)
take the first K routes, so the models differ only in how the map is scanned. Trained weights per
mode can be given with ``checkpoints={mode: path}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..ops import ScanMode
from .bench import BenchSettings, run_one
from .erf import ErfResult, compute_erf

SCAN_MODES = tuple(m.value for m in ScanMode)


@torch.no_grad()
def copy_shared_weights(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Copy every tensor of ``source`` into ``model`` where the shapes match, or where only the
    leading (route) dimension is smaller in the model (its first entries are copied). Returns the
    number of tensors copied.
    """
    copied = 0
    for key, target in model.state_dict().items():
        value = source.get(key)
        if value is None or value.dim() != target.dim():
            continue
        if value.shape == target.shape:
            target.copy_(value)
        elif value.dim() >= 1 and value.shape[1:] == target.shape[1:] and target.shape[0] <= value.shape[0]:
            target.copy_(value[: target.shape[0]])
        else:
            continue
        copied += 1
    return copied


def ablate_scan_modes(name: str, modes: Sequence[str] = SCAN_MODES, size: tuple[int, int] = (224, 224),
                      settings: BenchSettings | None = None, erf_images: int = 4, erf_batch: int = 2,
                      erf_folder: str | None = None, seed: int = 0, overrides: dict[str, Any] | None = None,
                      log=None, share_weights: bool = True,
                      checkpoints: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], list[ErfResult]]:
    """Rows (mode, params, FLOPs, throughput per bench mode, ERF areas) and the ERF maps.

    ``settings=None`` skips timing; ``erf_images=0`` skips the ERF.
    """
    from ._common import build_model, count_params, is_vmamba_model
    from .flops import count_model_flops

    if not is_vmamba_model(name):
        raise ValueError(f"the scan-mode ablation needs a VMamba model (see `vmamba models`), got {name!r}")
    unknown = [m for m in modes if m not in SCAN_MODES]
    if unknown:
        raise ValueError(f"unknown scan mode(s) {unknown}; choose from {', '.join(SCAN_MODES)}")
    rows, erfs = [], []
    reference: dict[str, torch.Tensor] | None = None
    for mode in modes:
        opts = {**(overrides or {}), "scan_mode": mode}
        torch.manual_seed(seed)
        checkpoint = (checkpoints or {}).get(mode)
        model = build_model(name, checkpoint=checkpoint, **opts)
        if share_weights and checkpoint is None:
            if reference is None:
                reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                copy_shared_weights(model, reference)
        model.model_name = f"{name}[{mode}]"
        row: dict[str, Any] = {"model": name, "scan_mode": mode, "routes": ScanMode(mode).num_routes,
                               "params": count_params(model),
                               "GFLOPs": count_model_flops(name, size, **opts).gflops}
        if settings is not None:
            for bench_mode in settings.modes:
                try:
                    timing = run_one(model, size, bench_mode, settings)
                    row[f"{bench_mode}_img_per_s"] = timing["img_per_s"]
                except RuntimeError as exc:
                    row[f"{bench_mode}_img_per_s"] = None
                    row["status"] = f"error: {str(exc).splitlines()[0][:100]}"
            model = model.cpu() if settings.resolved_device().type != "cpu" else model
        if erf_images > 0:
            device = settings.resolved_device() if settings is not None else torch.device("cpu")
            result = compute_erf(model.to(device), size, erf_images, erf_batch, erf_folder, seed)
            erfs.append(result)
            summary = result.summary()
            row.update({k: summary[k] for k in ("square20", "square50", "square99", "pixels50")})
        rows.append(row)
        if log is not None:
            log(f"  {name}[{mode}] done")
    return rows, erfs

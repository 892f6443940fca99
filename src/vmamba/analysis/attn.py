"""The implicit attention of the selective scan, mapped back onto the 2D feature map.

For fixed Δ, B and C the scan is linear in its input: y = M u per channel d, with

    M[d, i, j] = C_i · (Π_{k=j+1..i} exp(Δ_k A_d)) · Δ_j B_j     for j <= i, 0 otherwise,

written here as Σ_n C[n, i] · exp(A[d, n] · (S_i − S_j)) · Δ_j · B[n, j] with S the cumulative sum of
Δ (computed in float64, so the exponent is never positive and never loses the small terms).
The skip term D adds D_d on the diagonal; it is included only when asked (``include_d``).

In SS2D the K routes each read the map in their own pixel order (cross_scan) and their outputs are
summed back per pixel (cross_merge). So per channel the 2D map is

    A_d[p, q] = Σ_k M_k[d, pos_k(p), pos_k(q)]

(pixel p attends to pixel q), where pos_k(p) is the sequence position of pixel p on route k. Δ, B
and C are computed from the block's actual scan input (captured with a temporary wrapper around the
module's ``_scan_2d``, no change to the model) exactly as SS2D computes them. cascade2d (rows, then
columns of the result) is not a fixed linear map per channel and is not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.ss2d import SS2D, SSMCore
from ..ops import ScanMode, cross_scan

REDUCTIONS = ("absmean", "mean", "sum", "abssum")
MEMORY_BUDGET = 256 * 2**20  # bytes of float64 work space per chunk of channels


def _channel_chunk(batch: int, rows: int, length: int, state: int) -> int:
    """Channels per chunk so that the (b, chunk, rows, L, N) float64 decay tensor fits the budget."""
    return max(1, MEMORY_BUDGET // (8 * batch * rows * length * state))


def _delta(delta: Tensor, bias: Tensor | None, softplus: bool) -> Tensor:
    """Δ = softplus(delta + bias) in float64, (b, KC, L)."""
    out = delta.to(torch.float64)
    if bias is not None:
        out = out + bias.to(torch.float64)[:, None]
    return F.softplus(out) if softplus else out


def _per_channel(x: Tensor, channels: int) -> Tensor:
    """(b, K, N, L) shared by the channels of each of the K groups → (b, channels, N, L), float64."""
    batch, groups, state, length = x.shape
    x = x.to(torch.float64)[:, :, None].expand(batch, groups, channels // groups, state, length)
    return x.reshape(batch, channels, state, length)


def ssm_matrix(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
               delta_bias: Tensor | None = None, delta_softplus: bool = True,
               rows: Tensor | None = None) -> Tensor:
    """The scan's matrix M with y = M u, in the selective-scan layout.

    delta (b, KC, L), A (KC, N), B and C (b, K, N, L) as for :func:`vmamba.ops.selective_scan`.
    Returns (b, KC, R, L) in float64: row i holds the weights of inputs j on output i. ``rows``
    (R indices, default all L) selects the output positions; for query position(s) that is
    O(KC·R·L·N) work and memory instead of O(KC·L²·N). D (if given) is added on the diagonal.
    """
    dtype = torch.float64
    channels, length = delta.shape[1], delta.shape[2]
    dt = _delta(delta, delta_bias, delta_softplus)  # (b, KC, L)
    Bx = _per_channel(B, channels)  # (b, KC, N, L)
    Cx = _per_channel(C, channels)
    rows = torch.arange(length, device=delta.device) if rows is None else torch.as_tensor(rows,
                                                                                         device=delta.device)
    cum = dt.cumsum(-1)  # S_i
    diff = cum[..., rows, None] - cum[..., None, :]  # (b, KC, R, L): S_i - S_j
    causal = rows[:, None] >= torch.arange(length, device=delta.device)[None, :]  # (R, L)
    diff = torch.where(causal, diff, torch.zeros((), dtype=dtype, device=delta.device)).clamp_min(0)
    decay = torch.exp(A.to(dtype)[None, :, None, None, :] * diff[..., None])  # (b, KC, R, L, N)
    weights = torch.einsum("bdnr,bdrjn,bdnj->bdrj", Cx[..., rows], decay, Bx * dt[:, :, None, :])
    weights = weights * causal
    if D is not None:
        diagonal = (rows[:, None] == torch.arange(length, device=delta.device)[None, :]).to(dtype)
        weights = weights + D.to(dtype)[None, :, None, None] * diagonal
    return weights


# -- SS2D --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScanInputs:
    """What one SS2D block feeds its selective scan, for one scan input map x (b, di, H, W)."""

    u: Tensor  # (b, K*di, L)
    delta: Tensor  # (b, K*di, L), before bias and softplus
    A: Tensor  # (K*di, N)
    B: Tensor  # (b, K, N, L)
    C: Tensor  # (b, K, N, L)
    D: Tensor  # (K*di,)
    delta_bias: Tensor  # (K*di,)
    routes: int
    height: int
    width: int


def scan_inputs(module: SS2D, x: Tensor) -> ScanInputs:
    """Recompute the scan inputs SS2D builds from its scan input map x (after in-proj, conv, act)."""
    mode = module.config.scan_mode
    if mode is ScanMode.CASCADE2D:
        raise ValueError("cascade2d scans columns of the row-scan output: it has no single attention matrix; "
                         "use cross2d, bidi or unidi")
    batch, channels, height, width = x.shape
    xs = cross_scan(x, mode)  # (b, K, di, L)
    count, length = xs.shape[1], xs.shape[3]
    proj = torch.einsum("bkdl,kcd->bkcl", xs, module.x_proj_weight[:count])
    dt_low, B, C = proj.split([module.dt_rank, module.d_state, module.d_state], dim=2)
    if module.config.core is SSMCore.M0:
        delta = dt_low.repeat_interleave(channels // module.dt_rank, dim=2)
    else:
        delta = torch.einsum("bkrl,kdr->bkdl", dt_low, module.dt_projs_weight[:count])
    A, D, bias = module._scan_parameters(0, count)
    return ScanInputs(u=xs.reshape(batch, count * channels, length), delta=delta.reshape(batch, -1, length),
                      A=A, B=B.contiguous(), C=C.contiguous(), D=D, delta_bias=bias, routes=count,
                      height=height, width=width)


def route_orders(mode: ScanMode | str, height: int, width: int) -> Tensor:
    """(K, L): the pixel index (h·W + w) each route visits at each sequence position."""
    index = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    return cross_scan(index, mode)[0, :, 0].round().long()


def _reduce(values: Tensor, how: str, dim: int) -> Tensor:
    if how == "absmean":
        return values.abs().mean(dim)
    if how == "abssum":
        return values.abs().sum(dim)
    if how == "mean":
        return values.mean(dim)
    if how == "sum":
        return values.sum(dim)
    raise ValueError(f"unknown channel reduction {how!r}; choose one of {', '.join(REDUCTIONS)}")


def query_attention(module: SS2D, x: Tensor, query: tuple[int, int], include_d: bool = False,
                    per_route: bool = False) -> Tensor:
    """Per-channel weights of every pixel on the output at pixel ``query`` = (h, w).

    Returns (b, di, H, W) in float64 — the sum over the K routes — or (b, K, di, H, W) with
    ``per_route=True`` (the D term, if included, then sits on each route's diagonal).
    """
    inputs = scan_inputs(module, x)
    height, width = inputs.height, inputs.width
    qh, qw = query
    if not (0 <= qh < height and 0 <= qw < width):
        raise ValueError(f"query pixel {query} outside the {height}x{width} map")
    orders = route_orders(module.config.scan_mode, height, width).to(x.device)  # (K, L)
    batch, channels = x.shape[0], x.shape[1]
    pixel = qh * width + qw
    length = height * width
    out = torch.zeros(batch, inputs.routes, channels, length, dtype=torch.float64, device=x.device)
    chunk = _channel_chunk(batch, 1, length, inputs.A.shape[1])
    for k in range(inputs.routes):
        position = torch.tensor([int((orders[k] == pixel).nonzero()[0, 0])], device=x.device)
        for start in range(0, channels, chunk):
            stop = min(start + chunk, channels)
            sl = slice(k * channels + start, k * channels + stop)
            row = ssm_matrix(inputs.delta[:, sl], inputs.A[sl], inputs.B[:, k:k + 1], inputs.C[:, k:k + 1],
                             inputs.D[sl] if include_d else None, inputs.delta_bias[sl], True,
                             rows=position)[:, :, 0]  # (b, chunk, L) by sequence position
            out[:, k, start:stop].index_copy_(2, orders[k], row)
    out = out.view(batch, inputs.routes, channels, height, width)
    return out if per_route else out.sum(1)


def full_attention(module: SS2D, x: Tensor, include_d: bool = False, reduce: str | None = "absmean",
                   max_pixels: int = 4096, chunk: int | None = None) -> Tensor:
    """The whole (L, L) pixel-to-pixel matrix A[p, q] in row-major pixel order.

    Per channel (b, di, L, L) when ``reduce`` is None, else reduced over channels to (b, L, L).
    Channels are processed ``chunk`` at a time (default: as many as fit a 256 MiB work space);
    refuses maps larger than ``max_pixels`` pixels.
    """
    inputs = scan_inputs(module, x)
    length = inputs.height * inputs.width
    if length > max_pixels:
        raise ValueError(f"the full matrix of a {inputs.height}x{inputs.width} map has {length}^2 entries; "
                         f"use a query pixel or a smaller map (limit {max_pixels} pixels)")
    orders = route_orders(module.config.scan_mode, inputs.height, inputs.width).to(x.device)
    positions = orders.argsort(dim=1)  # (K, L): pos_k(p)
    batch, channels = x.shape[0], x.shape[1]
    chunk = chunk or _channel_chunk(batch, length, length, inputs.A.shape[1])
    parts = []
    for start in range(0, channels, chunk):
        stop = min(start + chunk, channels)
        total = torch.zeros(batch, stop - start, length, length, dtype=torch.float64, device=x.device)
        for k in range(inputs.routes):
            sl = slice(k * channels + start, k * channels + stop)
            m = ssm_matrix(inputs.delta[:, sl], inputs.A[sl], inputs.B[:, k:k + 1], inputs.C[:, k:k + 1],
                           inputs.D[sl] if include_d else None, inputs.delta_bias[sl], True)
            pos = positions[k]
            total += m[:, :, pos][:, :, :, pos]
        parts.append(total if reduce is None else _reduce(total, "abssum" if reduce.startswith("abs") else "sum", 1))
    if reduce is None:
        return torch.cat(parts, 1)
    merged = torch.stack(parts).sum(0)
    return merged / channels if reduce in ("absmean", "mean") else merged


# -- capturing the scan input of a block in a model ---------------------------------------------------------
def find_ss2d(model: nn.Module, stage: int, block: int) -> SS2D:
    """The SS2D of ``model.layers[stage].blocks[block]``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no VMamba stages (model.layers)")
    if not 0 <= stage < len(layers):
        raise ValueError(f"stage {stage} out of range: the model has {len(layers)} stages")
    blocks = layers[stage].blocks
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block {block} out of range: stage {stage} has {len(blocks)} blocks")
    found = [m for m in blocks[block].modules() if isinstance(m, SS2D)]
    if not found:
        raise ValueError(f"stage {stage} block {block} has no SS2D")
    return found[0]


@contextlib.contextmanager
def capture_scan_input(module: SS2D) -> Iterator[dict[str, Tensor]]:
    """Within the context, ``store["x"]`` receives the map (b, di, H, W) fed to ``module``'s 2D scan,
    whether it runs as the composition (``_scan_2d``) or as the fused CUDA core."""
    store: dict[str, Tensor] = {}
    # the composition takes (b, di, H, W), the fused core the pixel-order view (b, H, W, di)
    to_channel_first = {"_scan_2d": False, "_scan_routes_fused": True}
    names = tuple(to_channel_first)

    def capturing(original, permute: bool):
        def wrapper(x: Tensor) -> Tensor:
            store["x"] = (x.permute(0, 3, 1, 2) if permute else x).detach()
            return original(x)

        return wrapper

    for name in names:  # instance attributes shadow the methods; removed on exit
        setattr(module, name, capturing(getattr(module, name), to_channel_first[name]))
    try:
        yield store
    finally:
        for name in names:
            delattr(module, name)


@dataclasses.dataclass
class AttentionResult:
    model: str
    stage: int
    block: int
    query: tuple[int, int]
    grid: tuple[int, int]
    include_d: bool
    reduce: str
    map: Tensor  # (H, W) over the stage grid, reduced over channels, summed over routes
    route_maps: Tensor  # (K, H, W)
    full: Tensor | None  # (L, L) when asked
    image: Tensor  # (3, H_img, W_img) normalised input

    def summary(self) -> dict[str, Any]:
        flat = self.map.flatten()
        total = flat.abs().sum().item()
        h, w = self.grid
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        weights = self.map.abs() / max(total, 1e-300)
        mean_dist = (weights * ((ys - self.query[0]) ** 2 + (xs - self.query[1]) ** 2).sqrt()).sum().item()
        return {"model": self.model, "stage": self.stage, "block": self.block, "query": list(self.query),
                "grid": list(self.grid), "include_d": self.include_d, "reduce": self.reduce,
                "self_weight": self.map[self.query].item(), "max": flat.max().item(), "total_abs": total,
                "mean_distance": mean_dist, "routes": int(self.route_maps.shape[0])}


def attention_map(model: nn.Module, image: Tensor, stage: int, block: int, query: tuple[int, int] | None = None,
                  include_d: bool = False, reduce: str = "absmean", full: bool = False,
                  max_pixels: int = 4096) -> AttentionResult:
    """Run ``model`` on one image (3, H, W), capture the scan input of (stage, block), and compute the
    implicit attention of the query pixel (stage-grid coordinates; default the centre).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown channel reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    module = find_ss2d(model, stage, block)
    block = block % len(model.layers[stage].blocks)
    if module.config.scan_mode is ScanMode.CASCADE2D:
        scan_inputs(module, torch.zeros(1, 1, 1, 1))  # raises the explanation
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_scan_input(module) as store:
            model(image[None].to(next(model.parameters()).device))
        x = store["x"]
        height, width = x.shape[2], x.shape[3]
        if query is None:
            query = (height // 2, width // 2)
        with torch.no_grad():
            per_route = query_attention(module, x, query, include_d, per_route=True)[0]  # (K, di, H, W)
            route_maps = _reduce(per_route, reduce, 1)
            total = _reduce(per_route.sum(0), reduce, 0)
            matrix = full_attention(module, x, include_d, reduce, max_pixels)[0] if full else None
    finally:
        model.train(was_training)
    return AttentionResult(model=getattr(model, "model_name", type(model).__name__), stage=stage, block=block,
                           query=tuple(query), grid=(height, width), include_d=include_d, reduce=reduce,
                           map=total.cpu(), route_maps=route_maps.cpu(), full=None if matrix is None else matrix.cpu(),
                           image=image.cpu())


def plot_attention(result: AttentionResult, path: str, alpha: float = 0.6) -> None:
    """PNG: the image with the map overlaid (query marked), the map, each route, and the full matrix."""
    from ._common import denormalize, require_matplotlib

    plt = require_matplotlib()
    routes = result.route_maps.shape[0]
    panels = 2 + routes + (1 if result.full is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    axes = axes[0]
    image = denormalize(result.image).permute(1, 2, 0).numpy()
    img_h, img_w = image.shape[:2]
    shown = result.map.abs() if result.reduce in ("mean", "sum") else result.map
    up = F.interpolate(shown[None, None].float(), size=(img_h, img_w), mode="nearest")[0, 0]
    up = (up / up.max().clamp_min(1e-30)).numpy()
    gh, gw = result.grid
    qy, qx = (result.query[0] + 0.5) * img_h / gh, (result.query[1] + 0.5) * img_w / gw
    axes[0].imshow(image)
    axes[0].imshow(up, cmap="jet", alpha=alpha)
    axes[0].plot([qx], [qy], marker="+", color="white", markersize=12, mew=2)
    axes[0].set_title(f"{result.model}\nstage {result.stage} block {result.block}", fontsize=8)
    axes[1].imshow(shown.numpy(), cmap="viridis")
    axes[1].plot([result.query[1]], [result.query[0]], marker="+", color="red", markersize=10, mew=2)
    axes[1].set_title(f"sum of {routes} routes ({result.reduce})", fontsize=8)
    for k in range(routes):
        axes[2 + k].imshow(result.route_maps[k].numpy(), cmap="viridis")
        axes[2 + k].set_title(f"route {k}", fontsize=8)
    if result.full is not None:
        full = result.full.abs() if result.reduce in ("mean", "sum") else result.full
        axes[-1].imshow(torch.log10(full + 1e-12 * full.max()).numpy(), cmap="magma")
        axes[-1].set_title(f"full {gh * gw}x{gh * gw} (log10)", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

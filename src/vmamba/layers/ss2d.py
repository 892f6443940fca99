"""SS2D: the 2D selective-scan token mixer of VMamba, configured by explicit typed options."""

from __future__ import annotations

import dataclasses
import enum
import math

import torch
from torch import Tensor, nn

from ..ops import ScanMode, cross_merge, cross_scan, selective_scan
from ..ops.layer_norm import layer_norm_sum
from ..ops.selective_scan import ScanBackend, resolve_backend
from ..ops.ss2d_core import FUSED_MODES, fused_core_enabled, ss2d_core
from .norm import (
    LayerNorm,
    LayerNorm2d,
    coerce_enum_fields,
    make_activation,
    make_linear,
    to_channel_first,
    to_channel_last,
)


class SSMCore(str, enum.Enum):
    """Parameterisation of the per-route projections and of A, D and the Δ-bias."""

    V0 = "v0"  # vanilla VMamba: Δ via a low-rank dt projection, A (K*di, N), D per channel
    V05 = "v05"  # VMamba v2: the same parameters, grouped-projection formulation
    M0 = "m0"  # Mamba2-style: one Δ and one scalar A per head, no dt projection


class GateMode(str, enum.Enum):
    """The multiplicative z branch of in_proj."""

    NONE = "none"  # "_noz": in_proj produces only x
    ACTIVATED = "activated"  # y * act(z)
    LINEAR = "linear"  # "_nozact": y * z


class OutNormKind(str, enum.Enum):
    """Normalisation applied to the merged scan output."""

    LAYERNORM = "ln"
    NONE = "none"
    DWCONV3 = "dwconv3"
    CONV_NORM = "cnorm"
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class InitScheme(str, enum.Enum):
    """Initial values of A, D, Δ-bias and the dt projection."""

    V0 = "v0"  # Mamba: A = -(1..N), D = 1, Δ-bias = softplus⁻¹(log-uniform dt)
    V2 = "v2"  # Mamba2 heads: A = -1, D = 1, Δ-bias = 0.1·U(0, 1)


@dataclasses.dataclass(frozen=True)
class SS2DConfig:
    """Every behaviour of SS2D as a named option (replacing the published ``forward_type`` strings)."""

    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | None = None  # None: ceil(block width / 16)
    act: str = "silu"
    conv_kernel: int = 3  # depthwise conv before the scan; <= 1 disables it
    conv_bias: bool = False
    dropout: float = 0.0
    init: InitScheme = InitScheme.V0
    core: SSMCore = SSMCore.V05
    scan_mode: ScanMode = ScanMode.CROSS2D
    gate: GateMode = GateMode.NONE
    out_norm: OutNormKind = OutNormKind.LAYERNORM
    out_act: bool = False  # activation on the merged scan output
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0

    def __post_init__(self) -> None:
        coerce_enum_fields(self, dict(init=InitScheme, core=SSMCore, scan_mode=ScanMode, gate=GateMode,
                                      out_norm=OutNormKind))
        if self.d_state < 1:
            raise ValueError(f"SS2DConfig.d_state must be >= 1, got {self.d_state}")
        if self.ssm_ratio <= 0:
            raise ValueError(f"SS2DConfig.ssm_ratio must be > 0, got {self.ssm_ratio}")


def _route_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """Per-route projection out[b, k] = weight[k] @ x[b, k]: (K, O, I) x (B, K, I, L) → (B, K, O, L).

    The weight is broadcast over the batch explicitly, so its gradient is a batched product over
    (batch, route) pairs summed afterwards: a well-shaped GEMM, instead of one with a tiny output and a
    batch x length reduction that GPU libraries run slowly.
    """
    return torch.matmul(weight.expand(x.shape[0], *weight.shape), x)


def _at_least_fp32(x: Tensor) -> Tensor:
    """A is kept in float32 (or float64) even in a half-precision model: exp(ΔA) needs the range."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _OutNorm(nn.Module):
    """Parameter-free or depthwise-conv out-norms (the LayerNorm kinds use the norm layers directly)."""

    def __init__(self, kind: OutNormKind, channels: int, channel_first: bool) -> None:
        super().__init__()
        self.kind = kind
        self.channel_dim = 1 if channel_first else -1
        if kind in (OutNormKind.DWCONV3, OutNormKind.CONV_NORM):
            self.conv = nn.Sequential(
                to_channel_first(channel_first),
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                to_channel_last(channel_first),
            )
        if kind is OutNormKind.CONV_NORM:
            self.norm = LayerNorm2d(channels) if channel_first else LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind is OutNormKind.SOFTMAX:
            return x.softmax(dim=self.channel_dim)
        if self.kind is OutNormKind.SIGMOID:
            return torch.sigmoid(x)
        if self.kind is OutNormKind.NONE:
            return x
        x = self.conv(x)
        return self.norm(x) if self.kind is OutNormKind.CONV_NORM else x


def _make_out_norm(kind: OutNormKind, channels: int, channel_first: bool) -> nn.Module:
    if kind is OutNormKind.LAYERNORM:
        return LayerNorm2d(channels) if channel_first else LayerNorm(channels)
    return _OutNorm(kind, channels, channel_first)


class SS2D(nn.Module):
    """2D selective scan: in-proj → depthwise conv → act → K-route scan → merge → out-norm → out-proj.

    Input and output are (B, C, H, W) when ``channel_first`` else (B, H, W, C).
    """

    def __init__(self, d_model: int, config: SS2DConfig, channel_first: bool) -> None:
        super().__init__()
        self.config = config
        self.channel_first = channel_first
        d_inner = int(config.ssm_ratio * d_model)
        rank = math.ceil(d_model / 16) if config.dt_rank is None else config.dt_rank
        routes = config.scan_mode.num_routes
        self.d_inner, self.dt_rank, self.d_state, self.routes = d_inner, rank, config.d_state, routes
        if config.core is SSMCore.M0 and d_inner % rank:
            raise ValueError(f"m0 core: d_inner {d_inner} is not divisible into {rank} heads")

        # Directly held parameters first (the published state-dict order).
        self.x_proj_weight = nn.Parameter(torch.empty(routes, rank + 2 * config.d_state, d_inner))
        if config.core is SSMCore.M0:
            self.Ds = nn.Parameter(torch.empty(routes, rank, d_inner // rank))
            self.A_logs = nn.Parameter(torch.empty(routes, rank))
            self.dt_projs_bias = nn.Parameter(torch.empty(routes, rank))
        else:
            self.A_logs = nn.Parameter(torch.empty(routes * d_inner, config.d_state))
            self.Ds = nn.Parameter(torch.empty(routes * d_inner))
            self.dt_projs_weight = nn.Parameter(torch.empty(routes, d_inner, rank))
            self.dt_projs_bias = nn.Parameter(torch.empty(routes, d_inner))

        gated = config.gate is not GateMode.NONE
        if config.core is not SSMCore.V0:
            self.out_norm = _make_out_norm(config.out_norm, d_inner, channel_first)
        self.in_proj = make_linear(d_model, d_inner * (2 if gated else 1), False, channel_first)
        self.act = make_activation(config.act)
        if config.conv_kernel > 1:
            conv = nn.Conv2d(d_inner, d_inner, config.conv_kernel, padding=(config.conv_kernel - 1) // 2,
                             groups=d_inner, bias=config.conv_bias)
            # The Mamba2 layout wraps the conv between (here identity) permutes: key "conv2d.1.*".
            self.conv2d = nn.Sequential(nn.Identity(), conv, nn.Identity()) if config.core is SSMCore.M0 else conv
        else:
            self.conv2d = nn.Identity()
        if config.core is SSMCore.V0:
            self.out_norm = _make_out_norm(config.out_norm, d_inner, channel_first)
        self.out_proj = make_linear(d_inner, d_model, False, channel_first)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Initialise A, D, Δ-bias and the projections according to ``config.init``."""
        cfg = self.config
        bound = self.d_inner ** -0.5  # nn.Linear's default init for the stacked x projections
        self.x_proj_weight.uniform_(-bound, bound)
        if cfg.init is InitScheme.V2 or cfg.core is SSMCore.M0:
            self.Ds.fill_(1.0)
            self.A_logs.zero_()
            self.dt_projs_bias.uniform_(0.0, 1.0).mul_(0.1)
            if cfg.core is not SSMCore.M0:
                self.dt_projs_weight.uniform_(-(self.dt_rank ** -0.5), self.dt_rank ** -0.5)
            return
        std = self.dt_rank ** -0.5 * cfg.dt_scale
        self.dt_projs_weight.uniform_(-std, std)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(states).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    # -- scan core ---------------------------------------------------------------------------------
    def _scan_parameters(self, first: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """A (count*di, N), D (count*di) and Δ-bias (count*di) of routes [first, first+count)."""
        routes = slice(first, first + count)
        if self.config.core is SSMCore.M0:
            head_dim = self.d_inner // self.dt_rank
            A = -torch.exp(_at_least_fp32(self.A_logs[routes])).repeat_interleave(head_dim, dim=1).reshape(-1, 1)
            A = A.expand(-1, self.d_state)
            bias = self.dt_projs_bias[routes].repeat_interleave(head_dim, dim=1).reshape(-1)
            return A, self.Ds[routes].reshape(-1), bias
        per_route = self.d_inner
        channels = slice(first * per_route, (first + count) * per_route)
        A = -torch.exp(_at_least_fp32(self.A_logs[channels]))
        return A, self.Ds[channels], self.dt_projs_bias[routes].reshape(-1)

    def _scan_routes(self, xs: Tensor, first: int = 0) -> Tensor:
        """Project and scan route sequences xs (b, k, di, L) with the parameters of routes first..first+k."""
        batch, count, channels, length = xs.shape
        weights = self.x_proj_weight[first:first + count]
        proj = _route_matmul(weights, xs)
        dt_low, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        if self.config.core is SSMCore.M0:
            delta = dt_low.repeat_interleave(channels // self.dt_rank, dim=2)
        else:
            delta = _route_matmul(self.dt_projs_weight[first:first + count], dt_low)
        u = xs.reshape(batch, count * channels, length)
        delta = delta.reshape(batch, count * channels, length)
        A, D, bias = self._scan_parameters(first, count)
        y = selective_scan(u, delta, A, B.contiguous(), C.contiguous(), D, bias, True)
        return y.view(batch, count, channels, length)

    def _scan_2d(self, x: Tensor) -> Tensor:
        """(B, di, H, W) → merged scan output (B, di, H, W), float32.

        A map stored channels-last (NHWC memory) is read and written in that layout, so no transposed
        copy is made on the way in or out.
        """
        height, width = x.shape[2], x.shape[3]
        mode = self.config.scan_mode
        if mode is ScanMode.CASCADE2D:
            return self._scan_cascade(x)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            ys = self._scan_routes(cross_scan(x.permute(0, 2, 3, 1), mode, channel_last=True))
            return cross_merge(ys, height, width, mode, channel_last=True).permute(0, 3, 1, 2)
        ys = self._scan_routes(cross_scan(x, mode))
        return cross_merge(ys, height, width, mode)

    def _scan_cascade(self, x: Tensor) -> Tensor:
        """Rows in both directions (routes 0, 1), then columns of that result in both directions (2, 3)."""
        batch, channels, height, width = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(batch * height, channels, width)
        ys = self._scan_routes(torch.stack((rows, rows.flip(-1)), 1), first=0)
        rows = (ys[:, 0] + ys[:, 1].flip(-1)).view(batch, height, channels, width)
        cols = rows.permute(0, 3, 2, 1).reshape(batch * width, channels, height).to(x.dtype)
        ys = self._scan_routes(torch.stack((cols, cols.flip(-1)), 1), first=2)
        cols = (ys[:, 0] + ys[:, 1].flip(-1)).view(batch, width, channels, height)
        return cols.permute(0, 2, 3, 1)

    def _uses_fused_core(self, x: Tensor) -> bool:
        """The fused Triton core serves CUDA maps for the route scan modes of the Δ-projection cores."""
        return (x.is_cuda and fused_core_enabled() and self.config.core is not SSMCore.M0
                and self.config.scan_mode in FUSED_MODES
                and resolve_backend(None, x.device) is ScanBackend.TRITON)

    def _scan_routes_fused(self, x: Tensor) -> Tensor:
        """(B, H, W, di) → the K route outputs in pixel order, (K, B, H, W, di), via the fused core."""
        A, D, bias = self._scan_parameters(0, self.routes)
        return ss2d_core(x, self.x_proj_weight, self.dt_projs_weight, A, D, bias, self.config.scan_mode)

    def _merge_and_norm(self, ys: Tensor) -> Tensor:
        """Sum of the routes (K, B, H, W, di), out-activation and out-norm, in the model's layout."""
        norm = self.out_norm
        if isinstance(norm, nn.LayerNorm) and not self.config.out_act:  # the merge fused into the norm
            y = layer_norm_sum(ys, norm.weight, norm.bias, norm.eps)
            return y.permute(0, 3, 1, 2) if self.channel_first else y
        y = ys.sum(0)
        y = y.permute(0, 3, 1, 2) if self.channel_first else y
        if self.config.out_act:
            y = self.act(y)
        return self.out_norm(y)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        input_dtype = x.dtype
        x = self.in_proj(x)
        z = None
        if cfg.gate is not GateMode.NONE:
            x, z = x.chunk(2, dim=1 if self.channel_first else -1)
            if cfg.gate is GateMode.ACTIVATED:
                z = self.act(z)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        x = self.conv2d(x)
        if self._uses_fused_core(x):
            # The activation over the (B, H, W, C) view, the core's pixel order: torch.compile then
            # writes it in that order, not as a transposing copy (H200: 0.49 ms for stage 1's map).
            y = self._merge_and_norm(self._scan_routes_fused(self.act(x.permute(0, 2, 3, 1))))
        else:
            x = self.act(x)
            y = self._scan_2d(x)
            if not self.channel_first:
                y = y.permute(0, 2, 3, 1)
            if cfg.out_act:
                y = self.act(y)
            y = self.out_norm(y)
        if z is not None:
            y = y * z
        y = y.to(input_dtype)
        return self.dropout(self.out_proj(y))


__all__ = ["GateMode", "InitScheme", "OutNormKind", "SS2D", "SS2DConfig", "SSMCore"]

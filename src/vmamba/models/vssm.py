"""VSSM: the VMamba classifier, and VSSMBackbone: its multi-scale feature extractor."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import DownsampleKind, NormKind, SS2DConfig, StemKind, VSSBlock, make_downsample, make_norm, make_stem
from ..layers.norm import coerce_enum_fields


@dataclasses.dataclass(frozen=True)
class VSSMConfig:
    """Architecture of a VMamba model. ``dims`` as an int d means (d, 2d, 4d, 8d)."""

    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: int | tuple[int, ...] = 96
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4
    ssm: SS2DConfig = dataclasses.field(default_factory=SS2DConfig)
    mlp_ratio: float = 4.0
    mlp_act: str = "gelu"
    mlp_dropout: float = 0.0
    gated_mlp: bool = False
    drop_path_rate: float = 0.1
    drop_rate: float = 0.0  # dropout before the classifier head
    norm: NormKind = NormKind.LAYERNORM2D
    stem: StemKind = StemKind.V2
    downsample: DownsampleKind = DownsampleKind.V3
    patch_norm: bool = True
    posembed: bool = False
    img_size: int = 224

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        dims = self.dims
        dims = tuple(int(dims) * 2 ** i for i in range(len(self.depths))) if isinstance(dims, int) else tuple(dims)
        if len(dims) != len(self.depths):
            raise ValueError(f"VSSMConfig: {len(dims)} dims for {len(self.depths)} stages")
        object.__setattr__(self, "dims", dims)
        coerce_enum_fields(self, dict(norm=NormKind, stem=StemKind, downsample=DownsampleKind))
        if isinstance(self.ssm, dict):
            object.__setattr__(self, "ssm", SS2DConfig(**self.ssm))

    @property
    def channel_first(self) -> bool:
        return self.norm.channel_first

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return self.dims  # type: ignore[return-value]

    def min_input_size(self) -> int:
        """Smallest image side the stem accepts: one stem patch."""
        return self.patch_size


class VSSStage(nn.Module):
    """The blocks of one resolution, then the downsample to the next (identity for the last stage)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.forward_blocks(x))


class ClassifierHead(nn.Module):
    """norm → global average pool → dropout → linear (keys ``classifier.norm`` / ``classifier.head``)."""

    def __init__(self, num_features: int, num_classes: int, norm: NormKind, drop_rate: float) -> None:
        super().__init__()
        self.channel_first = norm.channel_first
        self.norm = make_norm(norm, num_features)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x)
        x = x.mean(dim=(2, 3)) if self.channel_first else x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.head(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _resolve_config(config: VSSMConfig | None, overrides: dict[str, Any]) -> VSSMConfig:
    config = config or VSSMConfig()
    return apply_overrides(config, overrides) if overrides else config


def apply_overrides(config: VSSMConfig, overrides: dict[str, Any]) -> VSSMConfig:
    """A copy of ``config`` with top-level fields, SS2D fields or ``channel_first`` replaced.

    Unknown names raise a ValueError that lists them.
    """
    top = {f.name for f in dataclasses.fields(VSSMConfig)}
    ssm_fields = {f.name for f in dataclasses.fields(SS2DConfig)}
    top_changes: dict[str, Any] = {}
    ssm_changes: dict[str, Any] = {}
    unknown = []
    for key, value in overrides.items():
        if key == "channel_first":
            top_changes["norm"] = NormKind.LAYERNORM2D if value else NormKind.LAYERNORM
        elif key in top:
            top_changes[key] = value
        elif key in ssm_fields:
            ssm_changes[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    if "dims" in top_changes and isinstance(top_changes["dims"], list):
        top_changes["dims"] = tuple(top_changes["dims"])
    ssm = top_changes.pop("ssm", config.ssm)
    if isinstance(ssm, dict):
        ssm = dataclasses.replace(config.ssm, **ssm)
    if ssm_changes:
        ssm = dataclasses.replace(ssm, **ssm_changes)
    return dataclasses.replace(config, ssm=ssm, **top_changes)


class VSSM(nn.Module):
    """VMamba classifier: stem (stride 4) → 4 stages of VSS blocks → norm → pool → head.

    timm-style: ``forward_features`` returns the last stage map in the model's layout (NCHW for
    channel-first models, NHWC for channel-last ones); ``forward_head`` pools and classifies.
    """

    def __init__(self, config: VSSMConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = _resolve_config(config, overrides)
        self.config = config
        self.channel_first = config.channel_first
        self.num_classes = config.num_classes
        self.in_chans = config.in_chans
        dims = config.stage_dims
        self.dims = dims
        self.num_features = dims[-1]
        self.patch_embed = make_stem(config.stem, config.in_chans, dims[0], config.patch_size, config.norm,
                                     config.patch_norm)
        if config.posembed:
            grid = config.img_size // config.patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], grid, grid))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(1, total - 1) for i in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            blocks = [
                VSSBlock(dims[i], config.ssm, config.norm, config.mlp_ratio, config.mlp_act, config.mlp_dropout,
                         rates[start + j], config.gated_mlp)
                for j in range(depth)
            ]
            start += depth
            last = i == len(config.depths) - 1
            downsample = nn.Identity() if last else make_downsample(config.downsample, dims[i], dims[i + 1],
                                                                    config.norm)
            self.layers.append(VSSStage(blocks, downsample))
        # A stage's map at its own resolution is the output of its blocks (the stage module also holds the
        # downsample to the next resolution); it is named by its last block, which forward hooks can see.
        self.feature_info = [
            dict(num_chs=dims[i], reduction=config.patch_size * 2 ** i, stage=i,
                 module=f"layers.{i}.blocks.{depth - 1}" if depth else f"layers.{i}")
            for i, depth in enumerate(config.depths)
        ]
        self._build_head()
        self.apply(_init_weights)
        from .checkpoint import register_state_dict_remap

        register_state_dict_remap(self)

    def _build_head(self) -> None:
        self.classifier = ClassifierHead(self.num_features, self.num_classes, self.config.norm, self.config.drop_rate)

    # -- timm interface ----------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"VSSM supports only average pooling, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        device = self.classifier.norm.weight.device
        self.classifier.head = (nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0
                                else nn.Identity())
        if num_classes > 0:
            _init_weights(self.classifier.head)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed is not None else set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed|^pos_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.blocks\.(\d+)", None),
                                                              (r"^layers\.(\d+)\.downsample", (99999,))])

    # -- timm feature interface --------------------------------------------------------------------
    def _to_format(self, x: Tensor, output_fmt: str) -> Tensor:
        fmt = str(getattr(output_fmt, "value", output_fmt))  # a str or timm's Format enum
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if (fmt == "NCHW") == self.channel_first:
            return x
        return x.permute(0, 2, 3, 1) if self.channel_first else x.permute(0, 3, 1, 2)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage maps (before each downsample) of ``indices``, as timm defines it.

        ``indices``: None for all stages, an int n for the last n, or a sequence of (possibly negative)
        stage indices. ``norm`` applies the classifier's norm to the last stage's map. Returns the list
        of maps when ``intermediates_only``, else (``forward_features`` output, maps).
        """
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            features = stage.forward_blocks(x)
            if i in take:
                out = self.classifier.norm(features) if norm and i == last and self.classifier else features
                intermediates.append(self._to_format(out, output_fmt))
            x = stage.downsample(features)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head / final norm); returns the indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        if prune_norm:
            self.classifier.norm = nn.Identity()
        return take

    # -- forward -----------------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError naming the problem when ``x`` is not a batch of images this model takes."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D image batch (B, {self.in_chans}, H, W), got a {x.dim()}-D tensor "
                             f"of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape "
                             f"{tuple(x.shape)}); layout must be NCHW")
        minimum = self.config.min_input_size()
        if x.shape[2] < minimum or x.shape[3] < minimum:
            raise ValueError(f"image {x.shape[2]}x{x.shape[3]} is smaller than the {minimum}x{minimum} "
                             "the stem needs")

    def stem(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            size = x.shape[2:4] if self.channel_first else x.shape[1:3]
            if pos.shape[2:] != size:
                pos = F.interpolate(pos, size=tuple(size), mode="bicubic", align_corners=False)
            x = x + (pos if self.channel_first else pos.permute(0, 2, 3, 1))
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class VSSMBackbone(VSSM):
    """Multi-scale VMamba: one normalised NCHW map per stage in ``out_indices`` (before downsampling).

    Keys match the published ``Backbone_VSSM``: no classifier, ``outnorm{i}`` per returned stage.
    """

    def __init__(self, config: VSSMConfig | None = None, out_indices: Sequence[int] = (0, 1, 2, 3),
                 **overrides: Any) -> None:
        self.out_indices = tuple(sorted(int(i) for i in out_indices))
        super().__init__(config, **overrides)
        bad = [i for i in self.out_indices if not 0 <= i < len(self.dims)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for {len(self.dims)} stages")
        self.num_classes = 0
        for i in self.out_indices:
            norm = make_norm(self.config.norm, self.dims[i])
            _init_weights(norm)
            self.add_module(f"outnorm{i}", norm)
        self.feature_info = [self.feature_info[i] for i in self.out_indices]

    def _build_head(self) -> None:
        self.classifier = None  # type: ignore[assignment]

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if num_classes:
            raise ValueError("VSSMBackbone has no classifier; build a VSSM for classification")

    def forward(self, x: Tensor) -> list[Tensor] | Tensor:  # type: ignore[override]
        x = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.layers):
            features = stage.forward_blocks(x)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(features)
                outputs.append((out if self.channel_first else out.permute(0, 3, 1, 2)).contiguous())
            x = stage.downsample(features)
        return outputs if self.out_indices else x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise ValueError("VSSMBackbone has no classifier head")

"""Build our models from the published implementation's constructor arguments.

The published ``VSSM`` / ``Backbone_VSSM`` are steered by strings (``forward_type="v05_noz"``,
``norm_layer="ln2d"``, ...). :func:`build_official` translates those keyword arguments into our typed
:class:`~vmamba.models.VSSMConfig` and returns an equivalent module whose state dict has the same keys
and shapes, so published weights load with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .layers import DownsampleKind, GateMode, InitScheme, NormKind, OutNormKind, SS2DConfig, SSMCore, StemKind
from .models import VSSM, VSSMBackbone, VSSMConfig
from .ops import ScanMode

# Defaults used for keyword arguments a caller leaves out.
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    patch_size=4, in_chans=3, num_classes=1000, depths=(2, 2, 9, 2), dims=96, ssm_d_state=16, ssm_ratio=2.0,
    ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=True, ssm_drop_rate=0.0, ssm_init="v0",
    forward_type="v05_noz", mlp_ratio=4.0, mlp_act_layer="gelu", mlp_drop_rate=0.0, gmlp=False,
    drop_path_rate=0.1, patch_norm=True, norm_layer="ln", downsample_version="v2", patchembed_version="v1",
    use_checkpoint=False, posembed=False, imgsize=224,
)
_BACKBONE_ONLY = {"out_indices", "pretrained"}

_NORMS = {"ln": NormKind.LAYERNORM, "ln2d": NormKind.LAYERNORM2D, "bn": NormKind.BATCHNORM}
_DOWNSAMPLES = {"v1": DownsampleKind.V1, "v2": DownsampleKind.V2, "v3": DownsampleKind.V3,
                "none": DownsampleKind.NONE}
_STEMS = {"v1": StemKind.V1, "v2": StemKind.V2}
_INITS = {"v0": InitScheme.V0, "v2": InitScheme.V2}
_ACTS = {"silu", "gelu", "relu", "sigmoid"}
_OUT_NORM_SUFFIXES = {"_onnone": OutNormKind.NONE, "_ondwconv3": OutNormKind.DWCONV3,
                      "_oncnorm": OutNormKind.CONV_NORM, "_onsoftmax": OutNormKind.SOFTMAX,
                      "_onsigmoid": OutNormKind.SIGMOID}
# Core names → (core, scan mode). "v052d" is our reading of the 2D-cascade variant (no reference data).
_CORES = {"v05": (SSMCore.V05, ScanMode.CROSS2D), "m0": (SSMCore.M0, ScanMode.CROSS2D),
          "v052d": (SSMCore.V05, ScanMode.CASCADE2D)}


@dataclasses.dataclass(frozen=True)
class ForwardType:
    """The options encoded in a published ``forward_type`` string."""

    core: SSMCore
    scan_mode: ScanMode
    gate: GateMode
    out_norm: OutNormKind
    out_act: bool


def parse_forward_type(forward_type: str) -> ForwardType:
    """Decode a published ``forward_type`` (``v0``, ``v05_noz``, ``m0_noz``, suffixes ``_no32`` ``_oact``
    ``_noz`` ``_nozact`` ``_on*``). Unknown cores or suffixes raise a ValueError naming them.

    ``_no32`` (and v0's forced float32 scan inputs) select nothing here: our scan always computes in
    float32 from exactly up-cast inputs, so casting them first would only cost memory.
    """
    if forward_type == "v0":
        return ForwardType(SSMCore.V0, ScanMode.CROSS2D, GateMode.ACTIVATED, OutNormKind.LAYERNORM, False)
    name = forward_type
    gate, out_norm, out_act = GateMode.ACTIVATED, OutNormKind.LAYERNORM, False
    changed = True
    while changed:
        changed = False
        for suffix in ("_no32", "_oact", "_nozact", "_noz", *_OUT_NORM_SUFFIXES):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                changed = True
                if suffix == "_oact":
                    out_act = True
                elif suffix == "_noz":
                    gate = GateMode.NONE
                elif suffix == "_nozact":
                    gate = GateMode.LINEAR
                elif suffix in _OUT_NORM_SUFFIXES:
                    out_norm = _OUT_NORM_SUFFIXES[suffix]
    if name not in _CORES:
        raise ValueError(f"unsupported forward_type {forward_type!r}: core {name!r} is not one of "
                         f"{', '.join(['v0', *_CORES])}")
    core, mode = _CORES[name]
    return ForwardType(core, mode, gate, out_norm, out_act)


def _choice(table: dict[str, Any], key: str, value: Any) -> Any:
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise ValueError(f"unsupported {key}={value!r}; supported: {', '.join(table)}")


def official_config(kwargs: dict[str, Any]) -> VSSMConfig:
    """Translate published ``VSSM`` keyword arguments into a :class:`VSSMConfig`."""
    unknown = sorted(set(kwargs) - set(OFFICIAL_DEFAULTS) - _BACKBONE_ONLY)
    if unknown:
        raise ValueError(f"unknown VSSM argument(s): {', '.join(unknown)}")
    args = {**OFFICIAL_DEFAULTS, **kwargs}
    forward = parse_forward_type(args["forward_type"])
    norm = _choice(_NORMS, "norm_layer", args["norm_layer"])
    if forward.core is SSMCore.V0 and norm is not NormKind.LAYERNORM:
        raise ValueError(f"forward_type 'v0' requires norm_layer='ln', got {args['norm_layer']!r}")
    for key in ("ssm_act_layer", "mlp_act_layer"):
        if str(args[key]).lower() not in _ACTS:
            raise ValueError(f"unsupported {key}={args[key]!r}; supported: {', '.join(sorted(_ACTS))}")
    rank = args["ssm_dt_rank"]
    if rank != "auto" and not isinstance(rank, int):
        raise ValueError(f"unsupported ssm_dt_rank={rank!r}; use 'auto' or an int")
    vanilla = forward.core is SSMCore.V0
    ssm = SS2DConfig(
        d_state=int(args["ssm_d_state"]),
        ssm_ratio=float(args["ssm_ratio"]),
        dt_rank=None if rank == "auto" else rank,
        # v0 hard-codes SiLU, a biased 3x3 depthwise conv and the v0 initialisation.
        act="silu" if vanilla else str(args["ssm_act_layer"]).lower(),
        conv_kernel=3 if vanilla else int(args["ssm_conv"]),
        conv_bias=True if vanilla else bool(args["ssm_conv_bias"]),
        dropout=float(args["ssm_drop_rate"]),
        init=InitScheme.V0 if vanilla else _choice(_INITS, "ssm_init", args["ssm_init"]),
        core=forward.core,
        scan_mode=forward.scan_mode,
        gate=forward.gate,
        out_norm=forward.out_norm,
        out_act=forward.out_act,
    )
    dims = args["dims"]
    return VSSMConfig(
        depths=tuple(args["depths"]),
        dims=dims if isinstance(dims, int) else tuple(dims),
        in_chans=int(args["in_chans"]),
        num_classes=int(args["num_classes"]),
        patch_size=int(args["patch_size"]),
        ssm=ssm,
        mlp_ratio=float(args["mlp_ratio"]),
        mlp_act=str(args["mlp_act_layer"]).lower(),
        mlp_dropout=float(args["mlp_drop_rate"]),
        gated_mlp=bool(args["gmlp"]),
        drop_path_rate=float(args["drop_path_rate"]),
        norm=norm,
        stem=_choice(_STEMS, "patchembed_version", args["patchembed_version"]),
        downsample=_choice(_DOWNSAMPLES, "downsample_version", args["downsample_version"]),
        patch_norm=bool(args["patch_norm"]),
        posembed=bool(args["posembed"]),
        img_size=int(args["imgsize"]),
    )


def build_official(constructor: str, kwargs: dict[str, Any]) -> nn.Module:
    """Our equivalent of the published ``VSSM`` / ``Backbone_VSSM`` built with ``kwargs``.

    ``constructor`` is ``"VSSM"`` or ``"Backbone_VSSM"`` (a ``vmamba.`` prefix is accepted).
    """
    kind = constructor.rsplit(".", 1)[-1]
    kwargs = dict(kwargs)
    if kind == "VSSM":
        extra = sorted(set(kwargs) & _BACKBONE_ONLY)
        if extra:
            raise ValueError(f"VSSM does not take {', '.join(extra)} (Backbone_VSSM does)")
        model: VSSM = VSSM(official_config(kwargs))
    elif kind == "Backbone_VSSM":
        out_indices = tuple(kwargs.pop("out_indices", (0, 1, 2, 3)))
        pretrained = kwargs.pop("pretrained", None)
        kwargs.pop("num_classes", None)
        kwargs.setdefault("norm_layer", "ln")
        model = VSSMBackbone(official_config({**kwargs, "num_classes": 0}), out_indices=out_indices)
        if pretrained:
            from .models import load_checkpoint

            load_checkpoint(model, pretrained, strict=False)
    else:
        raise ValueError(f"unknown constructor {constructor!r}; expected 'VSSM' or 'Backbone_VSSM'")
    if kwargs.get("use_checkpoint"):
        model.set_grad_checkpointing(True)
    return model

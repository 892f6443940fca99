"""Every registered VMamba model as a timm model: ``timm.create_model("vmamba_tiny_s1l8", ...)``.

Importing this module (``import vmamba`` does) registers one timm entrypoint per name of
``vmamba.list_models()``, with a ``pretrained_cfg`` tagged ``in1k`` (see :mod:`vmamba.pretrained`).

* ``pretrained=True`` downloads the authors' checkpoint and reads it with the restricted unpickler
  (:meth:`TimmVSSM.load_pretrained`); ``pretrained_cfg_overlay=dict(file=PATH)`` loads a local
  safetensors or weights-only file through timm's loader instead.
* ``features_only=True`` returns a :class:`VSSMFeatures` (a ``FeatureListNet``): NCHW maps of each
  stage *before* its downsample, for every layout. ``feature_cls="getter"`` uses
  :meth:`TimmVSSM.forward_intermediates` instead.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.models import (
    FeatureInfo,
    FeatureListNet,
    adapt_input_conv,
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .models import VSSM, get_config, list_models, remap_keys, unwrap_state_dict
from .models.checkpoint import CheckpointError, read_state_dict_file
from .pretrained import TAG, pretrained_cfg


class TimmVSSM(VSSM):
    """A :class:`VSSM` with timm's feature-extraction interface; same modules and state-dict keys."""

    def __init__(self, model_name: str, global_pool: str | None = "avg", output_stride: int | None = None,
                 **overrides: Any) -> None:
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"{model_name}: only average pooling is supported, got global_pool={global_pool!r}")
        if output_stride not in (None, 32):
            raise ValueError(f"{model_name}: output_stride {output_stride} is not supported (always 32)")
        super().__init__(get_config(model_name, **overrides))
        self.model_name = model_name

    # -- weights -----------------------------------------------------------------------------------
    def load_pretrained(self, path: str | Path, use_ema: bool | None = None) -> None:
        """Load a checkpoint file of any supported kind: safetensors, weights-only ``.pth``, or a
        published training checkpoint (read with the restricted unpickler; nothing in it runs).

        ``use_ema=None`` takes the EMA weights when the file has them (as timm does). A classifier
        head of another size than the model's is skipped; the stem is adapted to ``in_chans``.
        """
        state_dict = read_any_checkpoint(path, use_ema)
        state_dict = _adapt_state_dict(remap_keys(state_dict), self)
        own = self.state_dict()
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
        if shapes:
            raise CheckpointError(f"{path} does not match {self.model_name}: shapes {shapes[:3]}")
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("classifier.head.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path} does not match {self.model_name}: missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")


def read_any_checkpoint(path: str | Path, use_ema: bool | None = None) -> dict[str, Tensor]:
    """Flat state dict of a safetensors / weights-only / published (pickled-config) checkpoint.

    Torch zip files are always read by the restricted unpickler (nothing in them runs), so published
    training checkpoints and weights-only files take the same path. ``use_ema``: True requires
    ``model_ema``, False takes ``model``, None prefers ``model_ema`` when present.
    """
    from .tools.safe_pickle import UnsafeCheckpointError, read_checkpoint

    path = Path(path)
    if path.suffix == ".safetensors":
        return read_state_dict_file(path)
    try:
        obj, _ = read_checkpoint(path)
    except UnsafeCheckpointError as exc:
        if "legacy format" not in str(exc):
            raise CheckpointError(str(exc)) from None
        return read_state_dict_file(path, use_ema=bool(use_ema))  # torch.load(weights_only=True)
    if use_ema is None:
        has_ema = isinstance(obj, dict) and isinstance(obj.get("model_ema"), dict) and bool(obj["model_ema"])
        return unwrap_state_dict(obj, use_ema=has_ema)
    return unwrap_state_dict(obj, use_ema=use_ema)


def _adapt_state_dict(state_dict: dict[str, Tensor], model: VSSM) -> dict[str, Tensor]:
    """Drop a head of another size, adapt the first conv to the model's channels, fix 1x1 weights."""
    own = model.state_dict()
    out = dict(state_dict)
    for key in ("classifier.head.weight", "classifier.head.bias"):
        if key in out and (key not in own or out[key].shape != own[key].shape):
            del out[key]
    conv = "patch_embed.0.weight"
    if conv in out and conv in own and out[conv].shape[1] != own[conv].shape[1]:
        out[conv] = adapt_input_conv(own[conv].shape[1], out[conv])
    for key, value in list(out.items()):
        target = own.get(key)
        if target is None or value.shape == target.shape:
            continue
        if value.numel() == target.numel() and (value.dim() == 4 and target.dim() == 2
                                                or value.dim() == 2 and target.dim() == 4):
            out[key] = value.reshape(target.shape)
    return out


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: unwrap training checkpoints, rename published keys, fix 1x1 weights."""
    if any(k in state_dict for k in ("model", "model_ema", "state_dict")) and not all(
            isinstance(v, Tensor) for v in state_dict.values()):
        state_dict = unwrap_state_dict(state_dict)
    state_dict = remap_keys(state_dict)
    if isinstance(model, VSSM):
        own = model.state_dict()
        for key, value in list(state_dict.items()):
            target = own.get(key)
            if target is not None and value.shape != target.shape and value.numel() == target.numel() and \
                    {value.dim(), target.dim()} == {2, 4}:
                state_dict[key] = value.reshape(target.shape)
    return state_dict


# -- feature extraction ------------------------------------------------------------------------------
class _Stem(nn.Module):
    """The model's stem (+ position embedding) with an NCHW output."""

    def __init__(self, model: VSSM) -> None:
        super().__init__()
        self.patch_embed = model.patch_embed
        self.pos_embed = model.pos_embed
        self.channel_first = model.channel_first

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[2:] != x.shape[2:]:
                pos = nn.functional.interpolate(pos, size=tuple(x.shape[2:]), mode="bicubic", align_corners=False)
            x = x + pos
        return x


class _NCHW(nn.Module):
    """Runs ``module`` in the model's layout on NCHW input and returns NCHW."""

    def __init__(self, module: nn.Module, channel_first: bool) -> None:
        super().__init__()
        self.module = module
        self.channel_first = channel_first

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            return self.module(x)
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class VSSMFeatures(FeatureListNet):
    """timm ``FeatureListNet`` over a VSSM: ``stem``, ``layers_i`` (blocks), ``layers_i_downsample``.

    Returns the NCHW maps of the requested stages (taken after each stage's blocks, before its
    downsample). Like any FeatureListNet it exposes ``return_layers`` and ``feature_info`` (module
    names are this module's own keys), and runs only the stages it needs.
    """

    def __init__(self, model: VSSM, out_indices: Sequence[int] = (0, 1, 2, 3), output_fmt: str = "NCHW",
                 feature_concat: bool = False, flatten_sequential: bool = False) -> None:
        nn.ModuleDict.__init__(self)
        if str(getattr(output_fmt, "value", output_fmt)) != "NCHW":
            raise ValueError("VMamba feature maps are returned NCHW; use forward_intermediates for NHWC")
        take, max_index = feature_take_indices(len(model.layers), out_indices)
        info = [dict(info, module=f"layers_{i}") for i, info in enumerate(model.feature_info)]
        self.feature_info = FeatureInfo(info, tuple(take))
        from timm.layers import Format

        self.output_fmt = Format(output_fmt)
        self.concat = feature_concat
        self.grad_checkpointing = False
        self.return_layers = {f"layers_{i}": str(i) for i in take}
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_Stem(model))
        for i in range(max_index + 1):
            stage = model.layers[i]
            layers[f"layers_{i}"] = _NCHW(stage.blocks, model.channel_first)
            if i < max_index:
                layers[f"layers_{i}_downsample"] = _NCHW(stage.downsample, model.channel_first)
        self.update(layers)


# -- registration ------------------------------------------------------------------------------------
def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    feature_cls = kwargs.pop("feature_cls", None)
    if feature_cls is None or feature_cls == "list" or feature_cls is FeatureListNet:
        feature_cls = VSSMFeatures  # timm's FeatureListNet cannot reach inside our stage modules
    feature_cfg = dict(feature_cls=feature_cls, out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)))
    return build_model_with_cfg(
        TimmVSSM, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        model_name=variant,
        **kwargs,
    )


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"VMamba {name} (timm entrypoint); see vmamba.timm_registry."
    return entrypoint


default_cfgs = generate_default_cfgs({f"{name}.{TAG}": pretrained_cfg(name) for name in list_models()})


def register_all() -> list[str]:
    """Register (once) a timm entrypoint for every registered VMamba model; returns the names."""
    import timm.models._registry as timm_registry

    module = sys.modules[__name__]
    names = []
    for name in list_models():
        names.append(name)
        existing = getattr(module, name, None)
        if existing is not None and timm_registry._model_entrypoints.get(name) is existing:
            continue
        fn = _entrypoint(name)
        setattr(module, name, fn)
        if name not in default_cfgs:
            default_cfgs.update(generate_default_cfgs({f"{name}.{TAG}": pretrained_cfg(name)}))
        register_model(fn)
    return names


register_all()

__all__ = ["TimmVSSM", "VSSMFeatures", "checkpoint_filter_fn", "read_any_checkpoint", "register_all"]

"""Named configurations of every published VMamba model, and ``create_model`` / ``list_models``."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from ..layers import DownsampleKind, GateMode, InitScheme, NormKind, SS2DConfig, SSMCore, StemKind
from .vssm import VSSM, VSSMBackbone, VSSMConfig, apply_overrides

_REGISTRY: dict[str, VSSMConfig] = {}


def register_config(name: str, config: VSSMConfig) -> None:
    """Add a named architecture to the registry."""
    _REGISTRY[name] = config


def _vanilla(dims: int, depths: tuple[int, ...], drop_path: float) -> VSSMConfig:
    ssm = SS2DConfig(d_state=16, ssm_ratio=2.0, conv_bias=True, core=SSMCore.V0, gate=GateMode.ACTIVATED)
    return VSSMConfig(depths=depths, dims=dims, ssm=ssm, mlp_ratio=0.0, drop_path_rate=drop_path,
                      norm=NormKind.LAYERNORM, stem=StemKind.V1, downsample=DownsampleKind.V1)


def _v2(dims: int, depths: tuple[int, ...], ssm_ratio: float, drop_path: float) -> VSSMConfig:
    ssm = SS2DConfig(d_state=1, ssm_ratio=ssm_ratio, conv_bias=False, core=SSMCore.V05, gate=GateMode.NONE)
    return VSSMConfig(depths=depths, dims=dims, ssm=ssm, mlp_ratio=4.0, drop_path_rate=drop_path)


def _mamba2(dims: int, depths: tuple[int, ...], drop_path: float) -> VSSMConfig:
    ssm = SS2DConfig(d_state=64, ssm_ratio=1.0, conv_bias=False, core=SSMCore.M0, gate=GateMode.NONE,
                     init=InitScheme.V2)
    return VSSMConfig(depths=depths, dims=dims, ssm=ssm, mlp_ratio=4.0, drop_path_rate=drop_path)


# Published architectures (parameter counts checked against the reference model card in the tests).
register_config("vanilla_vmamba_tiny", _vanilla(96, (2, 2, 9, 2), 0.2))
register_config("vanilla_vmamba_small", _vanilla(96, (2, 2, 27, 2), 0.3))
register_config("vanilla_vmamba_base", _vanilla(128, (2, 2, 27, 2), 0.6))
register_config("vmamba_tiny_s2l5", _v2(96, (2, 2, 5, 2), 2.0, 0.2))
register_config("vmamba_small_s2l15", _v2(96, (2, 2, 15, 2), 2.0, 0.3))
register_config("vmamba_base_s2l15", _v2(128, (2, 2, 15, 2), 2.0, 0.6))
register_config("vmamba_tiny_s1l8", _v2(96, (2, 2, 8, 2), 1.0, 0.2))
register_config("vmamba_small_s1l20", _v2(96, (2, 2, 20, 2), 1.0, 0.3))
register_config("vmamba_base_s1l20", _v2(128, (2, 2, 20, 2), 1.0, 0.5))
register_config("vmamba_tiny_m2", _mamba2(96, (2, 2, 4, 2), 0.2))
# Mamba2 small/base have no published reference: they follow the s2l15 depth pattern at d_state 64.
register_config("vmamba_small_m2", _mamba2(96, (2, 2, 12, 2), 0.3))
register_config("vmamba_base_m2", _mamba2(128, (2, 2, 12, 2), 0.5))


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell-style pattern."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_config(name: str, **overrides: Any) -> VSSMConfig:
    """The registered configuration of ``name`` with ``overrides`` applied."""
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return apply_overrides(_REGISTRY[name], overrides) if overrides else _REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, checkpoint_path: str | os.PathLike | None = None,
                 features_only: bool = False, out_indices: tuple[int, ...] = (0, 1, 2, 3), use_ema: bool = False,
                 **overrides: Any) -> VSSM:
    """Build a registered model; optionally load a checkpoint (safetensors or weights-only .pth).

    ``features_only=True`` builds a :class:`VSSMBackbone` returning NCHW maps of ``out_indices``.
    Other keyword arguments override configuration fields (e.g. ``drop_path_rate=0.1``,
    ``channel_first=False``, ``scan_mode="bidi"``).
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = get_config(name, **overrides)
    model: VSSM = VSSMBackbone(config, out_indices=out_indices) if features_only else VSSM(config)
    model.model_name = name  # type: ignore[attr-defined]
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path, strict=not features_only, use_ema=use_ema)
    return model

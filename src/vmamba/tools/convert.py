"""``vmamba convert``: published ``.pth`` training checkpoints → safetensors, without running their pickles.

Steps: read the file with the restricted unpickler (:mod:`vmamba.tools.safe_pickle`), take ``model`` or
``model_ema``, apply the published key renames, find (or check) the registered architecture whose
state dict matches key for key and shape for shape, load the weights into that model, and write its
state dict as safetensors with the model name in the metadata.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import Tensor

from ..models import CheckpointError, create_model, get_config, list_models, load_checkpoint, remap_keys
from ..models.checkpoint import unwrap_state_dict
from ..models.vssm import VSSM, VSSMBackbone
from .safe_pickle import read_checkpoint

HEAD = "classifier.head.weight"


@dataclasses.dataclass
class ConversionReport:
    model: str
    num_classes: int
    tensors: int
    parameters: int
    weights: str  # "model" or "model_ema"
    ignored_objects: list[str]  # pickled globals replaced by inert stubs
    features_only: bool = False
    out_indices: tuple[int, ...] = ()


def read_training_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, Tensor], list[str]]:
    """(remapped state dict, stubbed globals) of a safetensors or torch zip checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from ..models import read_state_dict_file

        return remap_keys(read_state_dict_file(path)), []
    obj, stubbed = read_checkpoint(path)
    state_dict = unwrap_state_dict(obj, use_ema=use_ema)
    if any(k.startswith("backbone.") for k in state_dict):  # detection / segmentation checkpoint
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return remap_keys(state_dict), sorted(stubbed)


def _signature(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(stored: tuple[int, ...], own: tuple[int, ...]) -> bool:
    if stored == own:
        return True
    # 1x1 convolutions saved for per-pixel linear layers (and back)
    return stored[2:] == (1, 1) and stored[:2] == own or own[2:] == (1, 1) and own[:2] == stored


def _out_indices(keys) -> tuple[int, ...]:
    return tuple(sorted(int(k[len("outnorm"):].split(".")[0]) for k in keys if k.startswith("outnorm")
                        and k.endswith(".weight")))


def _build_meta(name: str, num_classes: int, out_indices: tuple[int, ...], overrides: dict | None = None) -> VSSM:
    with torch.device("meta"):
        if out_indices:
            return VSSMBackbone(get_config(name, **(overrides or {})), out_indices=out_indices)
        return VSSM(get_config(name, **{**(overrides or {}), "num_classes": num_classes}))


def _stored_depths(stored: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Blocks per stage, read from the ``layers.<i>.blocks.<j>.`` keys."""
    counts: dict[int, int] = {}
    for key in stored:
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "blocks" and parts[1].isdigit() \
                and parts[3].isdigit():
            counts[int(parts[1])] = max(counts.get(int(parts[1]), 0), int(parts[3]) + 1)
    return tuple(counts.get(i, 0) for i in range(max(counts) + 1)) if counts else ()


def match_models(state_dict: dict[str, Tensor], candidates: list[str] | None = None,
                 overrides: dict | None = None) -> list[str]:
    """Registered models whose state dict has exactly these keys with compatible shapes."""
    stored = {k: tuple(v.shape) for k, v in state_dict.items()}
    num_classes = stored[HEAD][0] if HEAD in stored else 0
    out_indices = _out_indices(stored)
    depths = _stored_depths(stored)
    matches = []
    for name in candidates or list_models():
        if get_config(name, **(overrides or {})).depths != depths:
            continue  # cheap filter before building the model (on the meta device)
        own = _signature(_build_meta(name, num_classes, out_indices, overrides))
        if own.keys() == stored.keys() and all(_fits(stored[k], own[k]) for k in own):
            matches.append(name)
    return matches


def _mismatch_summary(state_dict: dict[str, Tensor], name: str, overrides: dict | None = None) -> str:
    stored = {k: tuple(v.shape) for k, v in state_dict.items()}
    num_classes = stored[HEAD][0] if HEAD in stored else 0
    own = _signature(_build_meta(name, num_classes, _out_indices(stored), overrides))
    missing = [k for k in own if k not in stored]
    unexpected = [k for k in stored if k not in own]
    shapes = [f"{k} {stored[k]} vs {own[k]}" for k in own if k in stored and not _fits(stored[k], own[k])]
    parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    return "; ".join(parts) or "no difference"


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
                       use_ema: bool = False, overrides: dict | None = None) -> ConversionReport:
    """Convert ``src`` (a published or our own checkpoint) into a safetensors file ``dst``.

    ``model_name`` None picks the registered architecture that matches; ``overrides`` (API only)
    changes configuration fields of the candidates, e.g. for small test models.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    state_dict, stubbed = read_training_checkpoint(src, use_ema=use_ema)
    if model_name is not None:
        get_config(model_name)  # unknown names raise with suggestions
        if not match_models(state_dict, [model_name], overrides):
            summary = _mismatch_summary(state_dict, model_name, overrides)
            raise CheckpointError(f"{src} does not match {model_name}: {summary}")
    else:
        matches = match_models(state_dict, None, overrides)
        if not matches:
            raise CheckpointError(f"{src} matches no registered model ({len(state_dict)} tensors); "
                                  f"name one with --model to see the differences")
        model_name = matches[0]
    num_classes = state_dict[HEAD].shape[0] if HEAD in state_dict else 0
    out_indices = _out_indices(state_dict)
    if out_indices:
        model = create_model(model_name, features_only=True, out_indices=out_indices, **(overrides or {}))
    else:
        model = create_model(model_name, num_classes=num_classes, **(overrides or {}))
    load_checkpoint(model, state_dict, strict=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "vmamba_model": model_name,
        "num_classes": str(num_classes),
        "weights": "model_ema" if use_ema else "model",
        "source": src.name,
    }
    if out_indices:
        metadata["out_indices"] = ",".join(map(str, out_indices))
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata)
    return ConversionReport(
        model=model_name, num_classes=num_classes, tensors=len(tensors),
        parameters=sum(p.numel() for p in model.parameters()),
        weights=metadata["weights"], ignored_objects=stubbed,
        features_only=bool(out_indices), out_indices=out_indices,
    )


__all__ = ["ConversionReport", "convert_checkpoint", "match_models", "read_training_checkpoint"]

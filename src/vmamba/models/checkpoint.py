"""Reading checkpoints safely and mapping published key names onto ours.

Weights are read only with safetensors or ``torch.load(..., weights_only=True)``: nothing from a file
is ever unpickled as an arbitrary object.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Published prefix renames: (pattern on the whole key, replacement).
_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.ln_1\."), r"\1.norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.self_attention\."), r"\1.op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_state_dict_file(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """Tensors of a .safetensors or weights-only .pth/.pt file, unwrapped to a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"unreadable safetensors checkpoint {path}: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a weights-only checkpoint: it pickles Python objects ({_first_line(exc)}). "
            f"It was not loaded, since unpickling can run code. Convert it first: "
            f"`vmamba convert {path} OUT.safetensors`"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"unreadable checkpoint {path}: {_first_line(exc)}") from None
    return unwrap_state_dict(obj, use_ema=use_ema)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unwrap_state_dict(obj: object, use_ema: bool = False) -> dict[str, Tensor]:
    """The state dict inside a training checkpoint (``model``, ``model_ema``, ``state_dict`` wrappers)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    if use_ema:
        ema = obj.get("model_ema")
        if not isinstance(ema, Mapping) or not ema:
            raise CheckpointError("checkpoint has no EMA weights ('model_ema')")
        return unwrap_state_dict(ema)
    for key in ("model", "state_dict", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            return unwrap_state_dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint has no tensors; top-level keys: {sorted(map(str, obj))[:8]}")
    return tensors


def remap_keys(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Apply the published renames (and strip DDP / compile / OpenMMLab prefixes) to keys under ``prefix``."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        local = key[len(prefix):]
        for strip in _STRIP_PREFIXES:
            if local.startswith(strip):
                local = local[len(strip):]
        for pattern, repl in _RENAMES:
            local = pattern.sub(repl, local)
        out[prefix + local] = value
    return out


def _remap_hook(module: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    remapped = remap_keys(state_dict, prefix)
    if remapped.keys() != state_dict.keys():
        state_dict.clear()
        state_dict.update(remapped)
    pos = getattr(module, "pos_embed", None)
    key = prefix + "pos_embed"
    if isinstance(pos, Tensor) and key in state_dict and state_dict[key].shape != pos.shape:
        stored = state_dict[key]
        if stored.dim() == 4 and stored.shape[:2] == pos.shape[:2]:
            state_dict[key] = F.interpolate(stored.float(), size=tuple(pos.shape[2:]), mode="bicubic",
                                            align_corners=False).to(stored.dtype)


def register_state_dict_remap(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` accept the published old key names and resize ``pos_embed``."""
    model._register_load_state_dict_pre_hook(_remap_hook, with_module=True)


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Tensor], strict: bool = True,
                    use_ema: bool = False) -> nn.Module:
    """Load weights from a file or a state dict into ``model``.

    Accepts wrapped training checkpoints, the published old key names, DDP/compile/backbone prefixes and
    4-D 1x1 weights of per-pixel linear layers. With ``strict`` a mismatch raises a CheckpointError
    naming a few missing / unexpected / mis-shaped keys.
    """
    if isinstance(checkpoint, Mapping):
        state_dict = unwrap_state_dict(checkpoint, use_ema)
    else:
        state_dict = read_state_dict_file(checkpoint, use_ema)
    state_dict = remap_keys(state_dict)
    own = model.state_dict()
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        problems = []
        if missing:
            problems.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_preview(unexpected)}")
        if problems:
            raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))
    shapes = []
    for key, value in state_dict.items():
        if key in own and not _shapes_compatible(key, value, own[key]):
            shapes.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    if shapes:
        raise CheckpointError("checkpoint shapes do not match the model: " + _preview(shapes, 3))
    model.load_state_dict(state_dict, strict=strict)
    return model


def _shapes_compatible(key: str, stored: Tensor, own: Tensor) -> bool:
    if stored.shape == own.shape:
        return True
    if key.endswith("pos_embed") and stored.dim() == 4 and stored.shape[:2] == own.shape[:2]:
        return True
    return stored.dim() == 4 and own.dim() == 2 and stored.shape == (*own.shape, 1, 1)

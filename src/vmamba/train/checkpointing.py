"""Training checkpoints: atomic writes, weights-only reads, RNG states as plain tensors, safetensors export.

Everything stored is a tensor or a plain container of numbers / strings, so checkpoints load with
``torch.load(..., weights_only=True)`` and nothing from a file is ever unpickled as an arbitrary object.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models.checkpoint import CheckpointError, read_state_dict_file

CHECKPOINT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``vmamba train`` (weights-only load), with a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a weights-only checkpoint ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise CheckpointError(f"unreadable checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or "model" not in obj or "epoch" not in obj:
        raise CheckpointError(f"{path} is not a training checkpoint written by `vmamba train` (no model/epoch)")
    return obj


def read_checkpoint_with_meta(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """Any supported checkpoint file and the run metadata stored with it (empty for published files).

    Returns (object for ``load_checkpoint``, metadata with model_name / model_args / class_names / config).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        state = read_state_dict_file(path)
        meta: dict[str, Any] = {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            for key, value in raw.items():
                try:
                    meta[key] = json.loads(value)
                except ValueError:
                    meta[key] = value
        except Exception:  # metadata is optional
            meta = {}
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        read_state_dict_file(path)  # raises the core loader's clear CheckpointError
        raise
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    meta = {k: obj[k] for k in ("model_name", "model_args", "class_names", "config") if k in obj}
    return obj, meta


def export_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Save weights as .safetensors (atomically), with JSON-encoded run metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- RNG states as plain tensors ---------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and numbers."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), int(nps["pos"]), int(nps["has_gauss"]),
                         float(nps["cached"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

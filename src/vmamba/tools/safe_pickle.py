"""Read PyTorch checkpoints without executing anything stored in them.

``torch.save`` writes a zip archive holding ``<prefix>/data.pkl`` (a pickle whose tensors refer to
storages by persistent id) and one raw little-endian file per storage, ``<prefix>/data/<key>``.
:func:`read_checkpoint` unpickles ``data.pkl`` with :class:`RestrictedUnpickler`, which

* resolves only an allowlist of globals (tensor rebuild functions, storage types, ``OrderedDict``,
  ``torch.Size``), each replaced by our own implementation: no torch function named by the file runs;
* replaces every other global (a yacs ``CfgNode``, ``os.system``, ...) by :class:`Stub`, an inert class
  whose construction only records its arguments, so a tampered file cannot run code;
* loads storages itself from the archive records.

The result is plain containers, tensors and Stub instances.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be read safely (unknown format, corrupt archive, odd storages)."""


class Stub(dict):
    """Stand-in for any global a checkpoint names that is not on the allowlist.

    Calling, building or filling it only records data: ``args`` (constructor arguments), ``state``
    (``__setstate__``), dict items and appended items. Nothing of the named class or function runs.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items_list: list[Any] = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items_list.append(item)

    def extend(self, items: Any) -> None:
        self.items_list.extend(items)

    def __repr__(self) -> str:
        return f"<inert stub of {self.qualname}>"

    def __reduce__(self):  # never re-pickled as the original
        raise TypeError(f"{self!r} cannot be pickled")


def _make_stub(module: str, name: str) -> type:
    return type("Stub", (Stub,), {"qualname": f"{module}.{name}", "__module__": __name__})


class _StorageType:
    """What the allowlisted ``torch.<X>Storage`` globals resolve to: just a dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _TypeMarker:
    """What ``torch.Tensor`` resolves to: only passed to :func:`_rebuild_from_type` (not callable)."""

    def __repr__(self) -> str:
        return "<torch.Tensor marker>"


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> torch.Tensor:
    """Our own ``_rebuild_tensor_v2``: a strided view of a flat storage tensor; hooks are dropped."""
    if not isinstance(storage, torch.Tensor):
        raise UnsafeCheckpointError("tensor record without a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if offset < 0 or last >= storage.numel() or any(s < 0 for s in stride):
            raise UnsafeCheckpointError(f"tensor of size {size} does not fit its storage of {storage.numel()}")
    elif offset >= storage.numel():
        raise UnsafeCheckpointError("scalar tensor outside its storage")
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, requires_grad=False, backward_hooks=None, *state) -> torch.Tensor:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any = None) -> torch.Tensor:
    """``torch._tensor._rebuild_from_type_v2`` (tensors carrying Python attributes): plain tensor, attributes
    dropped; ``func`` must itself be one of our allowlisted rebuild functions."""
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise UnsafeCheckpointError(f"unsupported tensor rebuild function {func!r}")
    return func(*args)


def _as_size(*args: Any) -> torch.Size:
    return torch.Size(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _as_size,
    ("torch", "Tensor"): _TypeMarker(),
}
_ALLOWED.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of a ``data.pkl``: allowlisted globals only, inert stubs for the rest."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self.stubbed: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        self.stubbed.add(f"{module}.{name}")
        return _make_stub(module, name)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent record {type(pid).__name__}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if "/" in key or key.startswith("."):
            raise UnsafeCheckpointError(f"bad storage key {key!r}")
        try:
            data = self._archive.read(f"{self._prefix}data/{key}")
        except KeyError:
            raise UnsafeCheckpointError(f"storage {key} missing from the archive") from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if len(data) != numel * itemsize:
            raise UnsafeCheckpointError(f"storage {key}: {len(data)} bytes for {numel} x {dtype}")
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype)


def _data_pickle_name(archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise UnsafeCheckpointError("not a torch.save archive (no single '<name>/data.pkl' record)")
    return names[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, set[str]]:
    """Unpickle a ``torch.save`` zip checkpoint safely.

    Returns (object, names of the globals that were replaced by inert stubs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path} is not a zip-format torch checkpoint (files from torch < 1.6 use a legacy format that "
            f"is not supported; re-save it with a current torch in a trusted environment)"
        )
    with zipfile.ZipFile(path) as archive:
        name = _data_pickle_name(archive)
        prefix = name[: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little", b""):
            raise UnsafeCheckpointError("big-endian checkpoints are not supported")
        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(name)), archive, prefix)
        try:
            obj = unpickler.load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # malformed pickles raise many kinds of errors
            raise UnsafeCheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return obj, unpickler.stubbed


__all__ = ["RestrictedUnpickler", "Stub", "UnsafeCheckpointError", "read_checkpoint"]

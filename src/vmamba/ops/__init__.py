"""Operations: the selective scan (reference / torch / triton backends) and the 2D cross scan."""

from .cross_scan import ScanMode, cross_merge, cross_scan
from .selective_scan import (
    ScanBackend,
    resolve_backend,
    selective_scan,
    set_default_backend,
    triton_available,
    use_backend,
)
from .selective_scan_ref import selective_scan_reference
from .selective_scan_torch import linear_scan

__all__ = [
    "ScanBackend", "ScanMode", "cross_merge", "cross_scan", "linear_scan", "resolve_backend",
    "selective_scan", "selective_scan_reference", "set_default_backend",
    "triton_available", "use_backend",
]

"""Parameters and FLOPs with ``torch.utils.flop_counter``, in the published (fvcore) convention.

``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add and knows only the
matmul / convolution / attention family plus formulas registered for custom ops (our selective scan:
9·B·L·D·N + B·D·L). The published VMamba numbers were counted with fvcore, where

* one multiply-add is one FLOP (conv, linear, matmul, einsum; channel-first Linear2d runs as a conv),
* layer_norm / group_norm cost 5 per element (4 without affine parameters), batch_norm 2 (1) in
  eval mode, adaptive average pooling 1 per input element, bilinear upsampling 4 per output,
* everything else (activations, add, mul, softplus, permutes, the cross scan) costs nothing.

:func:`count_flops` reproduces that on top of FlopCounterMode: the multiply-add formulas are
halved, norm and pooling formulas are added (our classifier pools with ``x.mean``, which is
counted like adaptive pooling), and the scan keeps its own formula. ``convention="torch"`` gives
FlopCounterMode's own numbers (2 per multiply-add, norms free).

Counting runs on the ``meta`` device by default: no memory is allocated and no arithmetic is done,
so even the base models count in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..ops.layer_norm import use_triton_layer_norm
from ..ops.ss2d_core import use_fused_core

aten = torch.ops.aten
SCAN_OPS = (torch.ops.vmamba.selective_scan_fwd, torch.ops.vmamba.selective_scan_bwd)
CONVENTIONS = ("fvcore", "torch")
SCAN_CHOICES = ("auto", "include", "exclude")


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape is not None else 0


def _raw(fn: Callable) -> Callable:
    fn._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode: do not shape-wrap again
    return fn


def _halved(formula: Callable) -> Callable:
    """A registry formula (already shape-wrapped) divided by 2: multiply-adds instead of FLOPs."""

    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs) // 2

    return _raw(count)


def _layer_norm(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _numel(input_shape) * (5 if weight_shape is not None else 4)


def _group_norm(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _numel(input_shape) * (5 if weight_shape is not None else 4)


def _batch_norm_training_flag(args: tuple) -> bool:
    # native_batch_norm / _native_batch_norm_legit: (x, w, b, running_mean, running_var, training, ...);
    # the no_stats overload: (x, w, b, training, momentum, eps).
    flag = args[5] if len(args) >= 8 else args[3] if len(args) >= 4 else False
    return bool(flag)


def _batch_norm(input_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    affine = weight_shape is not None
    if _batch_norm_training_flag((input_shape, weight_shape, bias_shape, *args)):
        return _numel(input_shape) * (5 if affine else 4)
    return _numel(input_shape) * (2 if affine else 1)


def _batch_norm_eval(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _numel(input_shape) * (2 if weight_shape is not None else 1)


def _per_input_element(input_shape, *args, out_shape=None, **kwargs) -> int:
    return _numel(input_shape)


def _per_output_element(factor: int) -> Callable:
    def count(*args: Any, out_shape=None, **kwargs: Any) -> int:
        out = out_shape[0] if isinstance(out_shape, (tuple, list)) and out_shape and isinstance(
            out_shape[0], (tuple, list, torch.Size)) else out_shape
        return factor * _numel(out)

    return count


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def fvcore_mapping(include_scan: bool = True) -> dict[Any, Callable]:
    """FlopCounterMode ``custom_mapping`` for the fvcore convention."""
    mapping: dict[Any, Callable] = {}
    for op, formula in flop_registry.items():
        if op in SCAN_OPS:
            continue
        mapping[op] = _halved(formula)
    mapping.update({
        aten.native_layer_norm: _layer_norm,
        aten.native_group_norm: _group_norm,
        aten.native_batch_norm: _batch_norm,
        aten._native_batch_norm_legit: _batch_norm,
        aten._native_batch_norm_legit_no_training: _batch_norm_eval,
        aten.mean: _per_input_element,  # global average pooling written as x.mean(dims)
        aten._adaptive_avg_pool2d: _per_input_element,
        aten.upsample_nearest2d: _per_output_element(1),
        aten.upsample_bilinear2d: _per_output_element(4),
        aten.grid_sampler_2d: _per_output_element(4),
    })
    if not include_scan:
        mapping.update({op: _zero for op in SCAN_OPS})
    return mapping


def fvcore_einsum_flops(equation: str, shapes: list[tuple[int, ...]]) -> int | None:
    """fvcore's count for one einsum: exact for two batched-matmul patterns, otherwise numpy's
    ``einsum_path`` "Optimized FLOP count", which numpy prints with 4 significant digits and fvcore
    parses back and halves. None for equations numpy cannot plan.
    """
    import numpy as np

    equation = equation.replace(" ", "")
    letters = dict.fromkeys(c for c in equation if c.isalpha())
    canon = equation.translate({ord(c): 97 + i for i, c in enumerate(letters)})
    if canon == "abc,abd->acd" and len(shapes) == 2:
        n, c, t = shapes[0]
        return n * c * t * shapes[1][-1]
    if canon == "abc,adc->adb" and len(shapes) == 2:
        n, t, g = shapes[0]
        return n * t * g * shapes[1][1]
    try:
        arrays = [np.broadcast_to(np.zeros(1), s) for s in shapes]
        text = np.einsum_path(equation, *arrays, optimize="optimal")[1]
    except (ValueError, TypeError):
        return None
    for line in text.splitlines():
        if "optimized flop" in line.lower():
            return int(math.floor(float(line.split(":")[-1]) / 2))
    return None


class _FvcoreEinsum(TorchFunctionMode):
    """Replace what FlopCounterMode counted inside each ``torch.einsum`` by fvcore's own count."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.functional.einsum and func is not torch.einsum:
            return func(*args, **kwargs)
        before = sum(self.counter.flop_counts["Global"].values())
        out = func(*args, **kwargs)
        counted = sum(self.counter.flop_counts["Global"].values()) - before
        equation, operands = args[0], args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or not all(isinstance(t, torch.Tensor) for t in operands):
            return out
        target = fvcore_einsum_flops(equation, [tuple(t.shape) for t in operands])
        if target is not None and target != counted:
            for parent in set(self.counter.mod_tracker.parents):
                self.counter.flop_counts[parent][aten.bmm] += target - counted
        return out


@contextlib.contextmanager
def _route_projections_as_einsum():
    """Run SS2D's per-route projections as the einsum the published code uses, so fvcore's einsum
    count (and its rounding) applies to them; the result is the same product."""
    from ..layers import ss2d

    original = ss2d._route_matmul
    ss2d._route_matmul = lambda weight, x: torch.einsum("kij,bkjl->bkil", weight, x)
    try:
        yield
    finally:
        ss2d._route_matmul = original


def _has_ss2d(model: nn.Module) -> bool:
    from ..layers.ss2d import SS2D

    return any(isinstance(m, SS2D) for m in model.modules())


def _has_core(model: nn.Module, core: str) -> bool:
    from ..layers.ss2d import SS2D, SSMCore

    return any(isinstance(m, SS2D) and m.config.core is SSMCore(core) for m in model.modules())


@dataclasses.dataclass
class FlopReport:
    """FLOPs of one forward (and optionally backward) pass."""

    model: str
    input_shape: tuple[int, ...]
    params: int
    flops: int
    convention: str
    scan_counted: bool  # the selective scan's FLOPs are in the total
    by_operator: dict[str, int]
    by_module: dict[str, int]  # hierarchical module path (model class first) → FLOPs
    has_scan: bool = True  # the model contains SS2D blocks

    @property
    def scan_status(self) -> str:
        return ("counted" if self.scan_counted else "excluded") if self.has_scan else "-"

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def module_rows(self, depth: int = 2) -> list[dict[str, Any]]:
        """Per-module totals down to ``depth`` levels below the model (0 = the model only)."""
        rows = []
        for name in sorted(self.by_module, key=_module_sort_key):
            level = name.count(".")
            if level > depth:
                continue
            rows.append({"module": "  " * level + name.split(".", 1)[-1] if level else name,
                         "flops": self.by_module[name],
                         "share": self.by_module[name] / self.flops if self.flops else 0.0})
        return rows

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gflops"] = self.gflops
        return out


def _hierarchical_totals(recorded: dict[str, int]) -> dict[str, int]:
    """Module totals for every path prefix, including containers that are never called themselves
    (``ModuleList``): each recorded module's own share (its total minus its recorded children's)
    is added to all of its prefixes.
    """
    own = dict(recorded)
    for name, total in recorded.items():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:cut])
            if parent in recorded:
                own[parent] -= total
                break
    out: dict[str, int] = defaultdict(int)
    for name, value in own.items():
        parts = name.split(".")
        for cut in range(1, len(parts) + 1):
            out[".".join(parts[:cut])] += value
    return dict(out)


def _module_sort_key(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def count_flops(model: nn.Module, input_size: int | tuple[int, int] = 224, batch: int = 1,
                convention: str = "fvcore", scan: str = "auto", device: str | torch.device | None = None,
                backward: bool = False, einsum_rounding: bool | None = None) -> FlopReport:
    """Count parameters and FLOPs of ``model`` on a (batch, in_chans, H, W) input.

    ``scan``: "include" counts the selective scan with its registered formula, "exclude" counts it
    as 0, "auto" follows the official counter (which could not see the Mamba2 scan, so models with
    the Mamba2 core exclude it). ``device`` defaults to the model's device (use a model built on
    the meta device for speed, see :func:`count_model_flops`). ``backward`` adds a backward pass.
    ``einsum_rounding`` (fvcore convention only) counts each einsum as fvcore does, including its
    4-significant-digit rounding (a few parts per million). None (auto) turns it on unless the model
    has the v05 core, whose official implementation runs the route projections as grouped conv1d
    (counted exactly) where ours uses einsum.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if scan not in SCAN_CHOICES:
        raise ValueError(f"unknown scan counting {scan!r}; choose one of {', '.join(SCAN_CHOICES)}")
    include_scan = scan == "include" or (scan == "auto" and not _has_core(model, "m0"))
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    in_chans = int(getattr(model, "in_chans", 3))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(batch, in_chans, height, width, device=device, requires_grad=backward)
    if convention == "fvcore":
        mapping = fvcore_mapping(include_scan)
    else:
        mapping = {} if include_scan else {op: _zero for op in SCAN_OPS}
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, contextlib.ExitStack() as stack:
            # The fused CUDA kernels compute the same arithmetic as the composition, but the counter
            # cannot see inside custom ops: count the composition on every device.
            stack.enter_context(use_fused_core(False))
            stack.enter_context(use_triton_layer_norm(False))
            if einsum_rounding is None:
                einsum_rounding = not _has_core(model, "v05")
            if convention == "fvcore" and einsum_rounding and not backward:
                stack.enter_context(_route_projections_as_einsum())
                stack.enter_context(_FvcoreEinsum(counter))
            with torch.set_grad_enabled(backward):
                out = model(x)
                if backward:
                    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
                    out.float().sum().backward()
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    by_op: dict[str, int] = defaultdict(int)
    for op, value in counts.get("Global", {}).items():
        by_op[str(op).replace("aten.", "").replace("vmamba.", "")] += int(value)
    by_module = _hierarchical_totals({name: int(sum(ops.values())) for name, ops in counts.items()
                                      if name != "Global"})
    name = getattr(model, "model_name", type(model).__name__)
    return FlopReport(model=name, input_shape=tuple(x.shape), params=sum(p.numel() for p in model.parameters()),
                      flops=int(sum(by_op.values())), convention=convention, scan_counted=include_scan,
                      by_operator=dict(sorted(by_op.items(), key=lambda kv: -kv[1])), by_module=by_module,
                      has_scan=_has_ss2d(model))


WHERE = ("meta", "fake", "cpu")


def count_model_flops(name: str, input_size: int | tuple[int, int] = 224, batch: int = 1,
                      convention: str = "fvcore", scan: str = "auto", where: str = "meta", backward: bool = False,
                      **overrides: Any) -> FlopReport:
    """Build ``name`` (ours or timm) and count its FLOPs.

    ``where``: "meta" (default, fastest: meta tensors), "fake" (FakeTensorMode) or "cpu" (real
    tensors). A model that cannot be built or run on meta / fake tensors is counted on the CPU.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ._common import build_model

    if where not in WHERE:
        raise ValueError(f"unknown counting mode {where!r}; choose one of {', '.join(WHERE)}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    overrides.setdefault("img_size", size)
    if where != "cpu":
        try:
            context = torch.device("meta") if where == "meta" else FakeTensorMode()
            with context:
                model = build_model(name, **overrides)
                device = "meta" if where == "meta" else "cpu"  # fake tensors report the cpu device
                return count_flops(model, input_size, batch, convention, scan, device, backward)
        except (NotImplementedError, RuntimeError):
            pass  # some third-party models do data-dependent work at build time: count on the CPU
    model = build_model(name, **overrides)
    return count_flops(model, input_size, batch, convention, scan, "cpu", backward)

"""Exportable selective scan: the ``vmamba::selective_scan_fwd`` custom op as plain tensor operations.

``torch.export`` keeps the custom op as one opaque node (its fake implementation gives the shapes).
For consumers that cannot run our op (ONNX, other runtimes), :func:`decompose_scans` rewrites every such
node of an ``ExportedProgram`` into :func:`selective_scan_tensor`: a chunked parallel scan built only
from exp / mul / add / cat / pad / reshape, valid for symbolic batch sizes. The backend argument of the
op (torch or triton) is ignored, so programs traced on any device decompose the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32


def _doubling_scan(a: Tensor, b: Tensor, need_decay: bool) -> tuple[Tensor, Tensor]:
    """(running product of a, states of h_t = a_t h_{t-1} + b_t with h_{-1} = 0) along the last dim.

    log2(L) doubling steps; the running product is completed only when ``need_decay`` (no logarithms
    are taken: a may underflow to 0).
    """
    length = a.shape[-1]
    step = 1
    while step < length:
        b = torch.cat((b[..., :step], b[..., step:] + a[..., step:] * b[..., :-step]), dim=-1)
        if need_decay or step * 2 < length:
            a = torch.cat((a[..., :step], a[..., step:] * a[..., :-step]), dim=-1)
        step *= 2
    return a, b


def chunked_linear_scan(a: Tensor, b: Tensor, chunk: int | None = None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t along the last dim: doubling scans inside chunks, recursion across them.

    Only static Python control flow on the sequence length, so it traces with a symbolic batch.
    """
    chunk = chunk or CHUNK
    length = a.shape[-1]
    if length <= chunk:
        return _doubling_scan(a, b, need_decay=False)[1]
    pad = (-length) % chunk
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    n_chunks = (length + pad) // chunk
    decay, local = _doubling_scan(a.unflatten(-1, (n_chunks, chunk)), b.unflatten(-1, (n_chunks, chunk)),
                                  need_decay=True)
    ends = chunked_linear_scan(decay[..., -1], local[..., -1], chunk)
    carry = F.pad(ends[..., :-1], (1, 0))
    h = local + decay * carry[..., None]
    return h.flatten(-2)[..., :length]


def selective_scan_tensor(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          delta_bias: Tensor | None = None, delta_softplus: bool = True,
                          backend: str | None = None) -> Tensor:
    """Selective scan from traceable tensor ops only (same contract as ``vmamba.ops.selective_scan``).

    Unlike the torch backend it does not split channels into memory-bounded blocks (block sizes would
    depend on the batch size, which is symbolic in an exported graph), so it materialises the whole
    (batch, K*C, N, L) state once.
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (u, delta, A, B, C)) else torch.float32
    channels, groups = u.shape[1], B.shape[1]
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    u_c = u.to(dtype)
    # Channels as (groups, per_group) so B and C broadcast instead of being copied per channel.
    dt_g = dt.unflatten(1, (groups, channels // groups))[:, :, :, None, :]  # (b, K, C, 1, L)
    u_g = u_c.unflatten(1, (groups, channels // groups))[:, :, :, None, :]
    A_g = A.to(dtype).unflatten(0, (groups, channels // groups))[None, :, :, :, None]  # (1, K, C, N, 1)
    decay = torch.exp(dt_g * A_g)
    h = chunked_linear_scan(decay, (dt_g * u_g) * B.to(dtype)[:, :, None])  # (b, K, C, N, L)
    y = (h * C.to(dtype)[:, :, None]).sum(3).flatten(1, 2)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c
    return y


def _scan_fwd_decomposed(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         delta_bias: Tensor | None, delta_softplus: bool, backend: str,
                         save_states: bool = False) -> tuple[Tensor, Tensor]:
    """The forward op's (output, saved states) with tensor ops; nothing is saved (exported programs do
    not train through the op)."""
    y = selective_scan_tensor(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return y, y.new_zeros(0)


def scan_decompositions() -> dict:
    """{custom op overload: pure-tensor implementation}, for ``ExportedProgram.run_decompositions``."""
    return {torch.ops.vmamba.selective_scan_fwd.default: _scan_fwd_decomposed}


def decompose_scans(program: torch.export.ExportedProgram,
                    core_aten: bool = False) -> torch.export.ExportedProgram:
    """``program`` with every selective-scan custom op replaced by tensor ops.

    With ``core_aten`` the rest of the graph is lowered to the core ATen opset as well (what
    ``run_decompositions()`` does by default); otherwise other ops are kept as they are.
    """
    table = torch.export.default_decompositions() if core_aten else {}
    table.update(scan_decompositions())
    return program.run_decompositions(table)


def has_custom_scan(program: torch.export.ExportedProgram) -> bool:
    """True when the program still contains a ``vmamba::selective_scan`` op."""
    return any(node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "vmamba"
               for node in program.graph.nodes)


__all__ = ["chunked_linear_scan", "decompose_scans", "has_custom_scan", "scan_decompositions", "selective_scan_tensor"]

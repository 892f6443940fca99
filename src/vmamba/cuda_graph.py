"""Inference replayed from a CUDA graph: the forward's kernels issued with one host call.

Eager VMamba on a fast GPU is bound by the host: issuing a forward's few thousand PyTorch ops and
Triton launches takes longer than the GPU needs to run them (BENCHMARKS.md). Capturing the forward
once as a CUDA graph and replaying it removes that cost. Works for any ``nn.Module`` whose forward
does no host synchronisation (timm models included), so benchmarks can treat every model alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["GraphedInference", "graph_for_inference"]


class GraphedInference:
    """A captured inference forward; call it with an input of the captured shape, dtype and device."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_input: Tensor, static_output: Any,
                 clone_outputs: bool) -> None:
        self._graph = graph
        self._input = static_input
        self._output = static_output
        self.clone_outputs = clone_outputs

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._input.shape)

    def __call__(self, x: Tensor) -> Any:
        """The model's output for x. With ``clone_outputs=False`` the returned tensors are the graph's
        own buffers, overwritten by the next call."""
        if x.shape != self._input.shape or x.dtype != self._input.dtype or x.device != self._input.device:
            raise ValueError(f"graphed inference was captured for {self.input_shape} {self._input.dtype} on "
                             f"{self._input.device}; got {tuple(x.shape)} {x.dtype} on {x.device}")
        self._input.copy_(x)
        self._graph.replay()
        if not self.clone_outputs:
            return self._output
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, self._output)


def graph_for_inference(model: nn.Module, example: Tensor, amp_dtype: torch.dtype | None = None,
                        warmup_iters: int = 3, clone_outputs: bool = True) -> GraphedInference:
    """Capture ``model``'s eval-mode forward on inputs like ``example`` (CUDA) as a CUDA graph.

    The model is put in eval mode; the forward runs under ``torch.inference_mode`` and, if
    ``amp_dtype`` is given, autocast to it (with the weight cache off: each replay recasts the weights,
    so later weight updates are seen). The model's weights must stay where they are (same tensors),
    as the graph reads them in place. Batches of another shape need another capture.
    """
    if not example.is_cuda:
        raise ValueError(f"graph_for_inference needs a CUDA input, got one on {example.device}")
    on_other_device = [name for name, p in model.named_parameters() if p.device != example.device]
    if on_other_device:
        raise ValueError(f"graph_for_inference: the model's parameters (e.g. {on_other_device[0]}) are not on "
                         f"{example.device}, the input's device")
    model.eval()
    static_input = example.clone()  # same strides (channels-last stays channels-last)

    def forward() -> Any:
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                            cache_enabled=False):
            return model(static_input)

    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(warmup_iters):  # Triton compilation, cuDNN autotuning, lazy allocations
            forward()
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_output = forward()
    return GraphedInference(graph, static_input, static_output, clone_outputs)

"""Triton GPU kernels (optional): the selective scan and the 2D cross scan / merge.

Importing this subpackage imports Triton; the rest of ``vmamba`` never does so eagerly. Modules:

* :mod:`vmamba.ops.triton.selective_scan`: ``selective_scan_fwd`` / ``selective_scan_bwd``, the
  implementation behind the ``triton`` backend of :func:`vmamba.ops.selective_scan`.
* :mod:`vmamba.ops.triton.cross_scan`: ``cross_scan_triton`` / ``cross_merge_triton`` (autograd).
* :mod:`vmamba.ops.triton.ss2d_core`: fused SS2D core kernels (routes read in place from the channels-last map).
* :mod:`vmamba.ops.triton.layer_norm`: ``layer_norm_fwd`` / ``layer_norm_bwd``, LayerNorm of the sum of
  K stacked row inputs, behind :func:`vmamba.ops.layer_norm.layer_norm` on CUDA.
"""

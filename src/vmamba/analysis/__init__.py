"""Analysis tools: FLOPs, throughput, effective receptive fields, SSM attention maps, scan-mode ablations.

Each tool is a library function and a ``vmamba`` subcommand (see :mod:`vmamba.analysis.commands`).
Plots need matplotlib (``pip install 'vmamba[plot]'``), imported only when a PNG is asked for.
"""

from .flops import FlopReport, count_flops, count_model_flops

__all__ = ["FlopReport", "count_flops", "count_model_flops"]

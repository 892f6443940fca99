"""Analysis tools: FLOPs, throughput, effective receptive fields, SSM attention maps, scan-mode ablations.

Each tool is a library function and a ``vmamba`` subcommand (see :mod:`vmamba.analysis.commands`).
Plots need matplotlib (``pip install 'vmamba[plot]'``), imported only when a PNG is asked for.
"""

from .ablate import ablate_scan_modes
from .attn import attention_map, full_attention, query_attention, ssm_matrix
from .bench import BenchSettings, bench_models
from .erf import compute_erf
from .flops import FlopReport, count_flops, count_model_flops

__all__ = [
    "BenchSettings", "FlopReport", "ablate_scan_modes", "attention_map", "bench_models", "compute_erf",
    "count_flops", "count_model_flops", "full_attention", "query_attention", "ssm_matrix",
]

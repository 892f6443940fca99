"""Shared fixtures: where the reference data lives and how to load golden cases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels are tested on the CPU through Triton's interpreter. The switch is read when a kernel is
# decorated, so it is set here, before any test module imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("VMAMBA_REFERENCE", REPO.parent / "shared" / "reference"))


def triton_test_device() -> str:
    """Device for the Triton kernel tests; call it at module top, before importing kernel modules.

    With VMAMBA_TEST_CUDA=1 the compiled kernels run on the GPU ("cuda"; the module is skipped if
    there is none); otherwise they run on the CPU under Triton's interpreter ("cpu").
    """
    if os.environ.get("VMAMBA_TEST_CUDA", "0") == "1":
        if not torch.cuda.is_available():
            pytest.skip("VMAMBA_TEST_CUDA=1 but no CUDA device", allow_module_level=True)
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def reference_path(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"reference data missing: {path} (set VMAMBA_REFERENCE)")
    return path


def load_golden(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads(reference_path("golden", f"{case}.json").read_text())
    return meta, load_file(str(reference_path("golden", f"{case}.safetensors")))


def read_state_dict_listing(name: str) -> dict[str, tuple[int, ...]]:
    rows = reference_path("state_dicts", f"{name}.tsv").read_text().splitlines()[1:]
    out = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        out[key] = tuple(int(s) for s in shape.split("x"))
    return out


def model_card() -> dict[str, dict[str, str]]:
    lines = reference_path("model_card.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {row.split("\t")[0]: dict(zip(header, row.split("\t"))) for row in lines[1:]}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

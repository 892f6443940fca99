"""Whole-model parity with the published implementation's golden outputs and input gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import load_golden, rel_err

from vmamba.compat import build_official
from vmamba.ops import use_backend

CASES = ["v0_vanilla", "v05_noz_ln2d", "v05_noz_ln", "backbone_v05_noz_ln2d"]


def build_case(case: str):
    meta, tensors = load_golden(case)
    model = build_official(meta["constructor"], meta["kwargs"]).eval()
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    model.load_state_dict(state, strict=True)
    return meta, tensors, model


@pytest.mark.parametrize("case", CASES)
def test_state_dict_order_matches(case):
    meta, _, model = build_case(case)
    assert list(model.state_dict()) == meta["state_dict_keys"]
    assert sum(p.numel() for p in model.parameters()) == meta["n_params"]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_golden_outputs_and_input_gradients(case, backend):
    meta, tensors, model = build_case(case)
    x = tensors["input"].clone().requires_grad_(True)
    with use_backend(backend):
        out = model(x)
    outputs = out if isinstance(out, list) else [out]
    assert len(outputs) == len(meta["output_keys"])
    for value, key, shape in zip(outputs, meta["output_keys"], meta["output_shapes"]):
        assert list(value.shape) == shape
        assert rel_err(value, tensors[key]) < 1e-4, key
    sum(o.sum() for o in outputs).backward()
    assert rel_err(x.grad, tensors["grad.input"]) < 1e-4


def test_channel_first_weights_run_channel_last():
    """The ln2d golden weights loaded into the ln (channel-last) build give the same logits."""
    meta, tensors, _ = build_case("v05_noz_ln2d")
    model = build_official(meta["constructor"], {**meta["kwargs"], "norm_layer": "ln"}).eval()
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert rel_err(model(tensors["input"]), tensors["logits"]) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the automatic backend is Triton there)")
@pytest.mark.parametrize("case", CASES)
def test_golden_on_gpu_with_default_backend(case):
    meta, tensors, model = build_case(case)
    torch.backends.cudnn.allow_tf32 = False  # exact float32 convolutions for a 1e-4 comparison
    model = model.cuda()
    x = tensors["input"].cuda().requires_grad_(True)
    out = model(x)
    outputs = out if isinstance(out, list) else [out]
    for value, key in zip(outputs, meta["output_keys"]):
        assert rel_err(value.cpu(), tensors[key]) < 1e-4, key
    sum(o.sum() for o in outputs).backward()
    assert rel_err(x.grad.cpu(), tensors["grad.input"]) < 1e-4

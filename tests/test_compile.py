"""torch.compile of every registered model on the CPU matches eager.

Inductor compiles C++ kernels, so each model is compiled in a small version of its registered
configuration (two stages of one block, narrow widths): the same code paths (stem, SS2D core, gating,
layout, downsample and head of that configuration) at a fraction of the compile time. Models whose
small versions share their structure reuse the compiled graph.
"""

from __future__ import annotations

import pytest
import torch

import vmamba

SMALL = dict(dims=(8, 16), depths=(1, 1))


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    threads = inductor_config.compile_threads
    inductor_config.compile_threads = 1  # compile in-process: no worker pool to start on a small machine
    yield
    inductor_config.compile_threads = threads
    torch._dynamo.reset()


@pytest.mark.parametrize("name", vmamba.list_models())
def test_compiled_forward_matches_eager(name):
    model = vmamba.create_model(name, num_classes=4, **SMALL).eval()
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        x2 = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-4, atol=1e-5)


def test_compiled_training_step_matches_eager():
    """Backward through the scan custom op under compile (AOT autograd; eager kernels to stay fast)."""
    model = vmamba.create_model("vmamba_tiny_s1l8", num_classes=4, drop_path_rate=0.0, **SMALL)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 3])
    loss = torch.nn.functional.cross_entropy(model(x), target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_c = torch.nn.functional.cross_entropy(compiled(x), target)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)

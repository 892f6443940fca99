"""Triton cross_scan / cross_merge against the torch implementation, values and gradients.

CPU under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is imported); on a CUDA
machine with VMAMBA_TEST_CUDA=1 the compiled kernels run instead.
"""

import pytest
from conftest import triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported
pytest.importorskip("triton")

import torch  # noqa: E402

from vmamba.ops.cross_scan import cross_merge, cross_scan  # noqa: E402
from vmamba.ops.triton.cross_scan import cross_merge_triton, cross_scan_triton  # noqa: E402

MODES = ["cross2d", "bidi", "unidi"]


def _map(shape, dtype, channel_last, noncontig, seed):
    g = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    x = torch.randn(batch, height, width, channels, generator=g) if channel_last else torch.randn(*shape, generator=g)
    if noncontig:  # same values, transposed storage
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_and_merge_match_torch(mode, channel_last, dtype):
    shape = (2, 3, 5, 7)  # odd sizes: partial tiles in every dimension
    x = _map(shape, dtype, channel_last, noncontig=dtype == torch.float32, seed=1)
    y = cross_scan_triton(x, mode, channel_last)
    y_ref = cross_scan(x, mode, channel_last)
    assert y.shape == y_ref.shape and y.dtype == x.dtype and y.is_contiguous()
    assert torch.equal(y, y_ref)

    z = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    m = cross_merge_triton(z, 5, 7, mode, channel_last)
    m_ref = cross_merge(z.float(), 5, 7, mode, channel_last)
    assert m.shape == m_ref.shape and m.dtype == dtype and m.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(m.float(), m_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channel_last", [False, True])
def test_gradients_are_adjoint(mode, channel_last):
    x = _map((1, 4, 3, 6), torch.float32, channel_last, noncontig=False, seed=3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = cross_scan_triton(x, mode, channel_last)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y.backward(gy)
    cross_scan(x_ref, mode, channel_last).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)

    z = gy.detach().clone().requires_grad_()
    z_ref = gy.detach().clone().requires_grad_()
    gm = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cross_merge_triton(z, 3, 6, mode, channel_last).backward(gm)
    cross_merge(z_ref, 3, 6, mode, channel_last).backward(gm)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-6, atol=1e-6)


def test_bad_arguments():
    x = _map((1, 2, 3, 3), torch.float32, False, False, seed=0)
    with pytest.raises(ValueError):
        cross_scan_triton(x, "cascade2d")
    with pytest.raises(ValueError):
        cross_merge_triton(torch.zeros(1, 3, 2, 9), 3, 3, "cross2d")

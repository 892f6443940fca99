"""The backward kernels' partial sums (vmamba.ops.triton.partial_sums) against torch.sum."""

import pytest
from conftest import triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported
pytest.importorskip("triton")

import torch  # noqa: E402

from vmamba.ops.triton.partial_sums import sum_partials  # noqa: E402


def _source(slices, rows, parts, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(slices, rows, parts, cols, generator=g).to(DEVICE)


@pytest.mark.parametrize("shapes", [
    # odd sizes: partial column tiles, partial steps over P, one job of each slice count
    [(2, 5, 3, 49)],
    [(3, 1, 37, 70), (1, 1, 2, 300)],
    [(2, 6, 12, 49), (3, 1, 9, 20), (1, 2, 1, 33)],
    # four jobs: two launches
    [(1, 1, 5, 8), (2, 3, 4, 5), (1, 2, 3, 4), (3, 1, 2, 7)],
])
def test_sums_match_torch(shapes):
    sources = [_source(*shape, seed=i) for i, shape in enumerate(shapes)]
    outs = sum_partials(*sources)
    assert len(outs) == len(sources)
    for src, dst in zip(sources, outs):
        assert len(dst) == src.shape[0]
        for i, out in enumerate(dst):
            assert out.shape == (src.shape[1], src.shape[3]) and out.dtype == torch.float32
            torch.testing.assert_close(out, src[i].sum(1), rtol=1e-5, atol=1e-5)


def test_outputs_do_not_share_storage():
    """Custom ops may not return tensors that alias each other: each slice's sum is a tensor of its own."""
    (first, second, third), = sum_partials(_source(3, 2, 4, 5, seed=3))
    storages = {t.untyped_storage().data_ptr() for t in (first, second, third)}
    assert len(storages) == 3


def test_no_partials_sum_to_zero():
    (out,), = sum_partials(torch.empty(1, 3, 0, 5, device=DEVICE))
    assert torch.equal(out, torch.zeros(3, 5, device=DEVICE))


def test_bad_sources_are_refused():
    with pytest.raises(ValueError, match="1-3 slices"):
        sum_partials(torch.zeros(4, 3, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="1-3 slices"):
        sum_partials(torch.zeros(0, 3, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        sum_partials(torch.zeros(2, 3, 4, 5, device=DEVICE).transpose(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        sum_partials(torch.zeros(3, 4, 5, device=DEVICE))

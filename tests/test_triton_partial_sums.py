"""The backward kernels' partial sums (vmamba.ops.triton.partial_sums) against torch.sum."""

import pytest
from conftest import triton_test_device

DEVICE = triton_test_device()  # before any kernel module is imported
pytest.importorskip("triton")

import torch  # noqa: E402

from vmamba.ops.triton.partial_sums import PartialSums, sum_partials  # noqa: E402


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
    outs = [tuple(torch.full((s.shape[1], s.shape[3]), float("nan"), device=DEVICE) for _ in range(s.shape[0]))
            for s in sources]
    sum_partials(*(PartialSums(s, o) for s, o in zip(sources, outs)))
    for src, dst in zip(sources, outs):
        for i, out in enumerate(dst):
            torch.testing.assert_close(out, src[i].sum(1), rtol=1e-5, atol=1e-5)


def test_destinations_take_any_contiguous_shape():
    src = _source(2, 4, 6, 10, seed=3)
    first, second = torch.empty(4, 1, 10, device=DEVICE), torch.empty(40, device=DEVICE)
    sum_partials(PartialSums(src, (first, second)))
    torch.testing.assert_close(first[:, 0], src[0].sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.view(4, 10), src[1].sum(1), rtol=1e-5, atol=1e-5)


def test_no_partials_sum_to_zero():
    out = torch.full((3, 5), 7.0, device=DEVICE)
    sum_partials(PartialSums(torch.empty(1, 3, 0, 5, device=DEVICE), (out,)))
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_jobs_are_refused():
    src = torch.zeros(2, 3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="one destination each"):
        PartialSums(src, (torch.empty(15, device=DEVICE),))
    with pytest.raises(ValueError, match="15 elements"):
        PartialSums(src, (torch.empty(15, device=DEVICE), torch.empty(16, device=DEVICE)))
    with pytest.raises(ValueError, match="contiguous"):
        PartialSums(src.transpose(2, 3), (torch.empty(15, device=DEVICE),) * 2)

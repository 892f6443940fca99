"""Cross scan / merge: published route orders, adjointness, both layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_path

from vmamba.ops import ScanMode, cross_merge, cross_scan

ROUTE_MODES = [ScanMode.CROSS2D, ScanMode.BIDI, ScanMode.UNIDI]


def test_cross2d_orders_match_reference():
    rows = reference_path("cross_scan_orders.tsv").read_text().splitlines()[1:]
    x = torch.arange(12.0).view(1, 1, 3, 4)
    seqs = cross_scan(x, ScanMode.CROSS2D)
    for row in rows:
        mode, _, k, order = row.split("\t")
        assert mode == "cross2d"
        assert seqs[0, int(k), 0].long().tolist() == [int(i) for i in order.split()]


@pytest.mark.parametrize("mode", ROUTE_MODES)
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("size", [(3, 4), (7, 9), (1, 5)])
def test_merge_is_adjoint_of_scan(mode, channel_last, size):
    height, width = size
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    if channel_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    seqs = cross_scan(x, mode, channel_last=channel_last)
    assert seqs.shape == (2, mode.num_routes, 3, height * width)
    y = torch.randn_like(seqs)
    merged = cross_merge(y, height, width, mode, channel_last=channel_last)
    assert merged.shape == x.shape
    assert torch.allclose((seqs * y).sum(), (x * merged).sum())


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_layouts_agree(mode):
    x = torch.randn(2, 5, 7, 9)
    first = cross_scan(x, mode)
    last = cross_scan(x.permute(0, 2, 3, 1), mode, channel_last=True)
    assert torch.equal(first, last)
    merged_first = cross_merge(first, 7, 9, mode)
    merged_last = cross_merge(first, 7, 9, mode, channel_last=True)
    assert torch.equal(merged_first.permute(0, 2, 3, 1), merged_last)


def test_merge_of_scan_counts_routes():
    x = torch.randn(1, 2, 4, 6)
    assert torch.allclose(cross_merge(cross_scan(x), 4, 6), 4 * x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="4-D"):
        cross_scan(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expects"):
        cross_merge(torch.randn(1, 2, 3, 12), 3, 4, ScanMode.CROSS2D)
    with pytest.raises(ValueError, match="cascade2d"):
        cross_scan(torch.randn(1, 2, 3, 4), ScanMode.CASCADE2D)

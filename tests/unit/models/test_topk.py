"""models.topk: the chunked top-K returns what torch.topk returns."""

from __future__ import annotations

import pytest
import torch

from models.topk import chunked_topk


@pytest.mark.parametrize("V", [4096, 5000, 64 * 100 + 1, 70_000])
@pytest.mark.parametrize("k", [1, 10, 42])
def test_same_values_as_torch_topk(V, k):
    g = torch.Generator().manual_seed(V + k)
    full = torch.randn(7, V + 5, generator=g)
    s = full[:, 5:]  # a strided view, as serving passes the known-item columns
    s[0, -1] = 100.0  # the best value in the partial last chunk
    s[1, :k] = -1e9  # the worst in the first chunk
    s[2] = float("-inf")
    s[2, 17] = 1.0
    ref_v, ref_i = torch.topk(s, k, dim=1)
    v, i = chunked_topk(s, k, min_width=1)
    assert torch.equal(v, ref_v)
    assert torch.equal(s.gather(1, i), v)  # the indices point at those values
    assert all(len(set(row)) == k for row in i.tolist())  # no column twice (partial chunk padding)
    assert torch.equal(i[:2], ref_i[:2])  # distinct random values: the same columns in the same order


def test_ties_narrow_rows_and_bad_k():
    s = torch.zeros(2, 10_000)
    s[:, 5000:5010] = 1.0
    v, i = chunked_topk(s, 10)
    assert torch.equal(v, torch.ones(2, 10)) and sorted(i[0].tolist()) == list(range(5000, 5010))
    narrow = torch.randn(3, 50)
    assert torch.equal(chunked_topk(narrow, 5)[0], torch.topk(narrow, 5, dim=1).values)
    with pytest.raises(ValueError, match="k=51 is larger than the row width 50"):
        chunked_topk(narrow, 51)

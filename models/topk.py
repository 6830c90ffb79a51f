"""Top-K over a wide score matrix, faster than ``torch.topk`` on CPU for catalogue-sized rows.

``torch.topk`` over ``[B, V]`` with V ≈ 50k–1M items spends its time in a per-row selection. Cut
each row into chunks of ``chunk`` columns: the best ``k`` values of a row all lie in the ``k``
chunks with the largest maxima (a value outside them is beaten by each of those ``k`` maxima), so
one vectorised max per chunk, a small top-K over the chunk maxima and a top-K over the ``k × chunk``
gathered values give the same values as ``torch.topk`` (the order among equal values may differ;
timings: docs/serving.md, top-K on the device).

>>> s = torch.tensor([[0.1, 5.0, 0.3, 4.0, 0.2, 9.0, 0.0]])
>>> v, i = chunked_topk(s, 2, chunk=2, min_width=1)
>>> v.tolist(), i.tolist()
([[9.0, 5.0]], [[5, 1]])
"""

from __future__ import annotations

import torch

#: Rows narrower than this go straight to ``torch.topk``.
MIN_WIDTH = 4096


def chunked_topk(scores: torch.Tensor, k: int, chunk: int = 64, min_width: int = MIN_WIDTH
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` for a 2-D ``scores [B, V]`` (values, column indices),
    sorted best first. ``k`` must be ``<= V``."""
    B, V = scores.shape
    if k > V:
        raise ValueError(f"k={k} is larger than the row width {V}")
    if V < min_width or k * chunk >= V:
        return torch.topk(scores, k, dim=1)
    n = V // chunk
    maxima = scores[:, :n * chunk].unflatten(1, (n, chunk)).amax(-1)  # (B, n)
    if n * chunk < V:  # the last, partial chunk
        maxima = torch.cat([maxima, scores[:, n * chunk:].amax(-1, keepdim=True)], 1)
    best = torch.topk(maxima, k, dim=1).indices  # (B, k) chunks
    cols = (best[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).flatten(1)  # (B, k*chunk)
    inside = cols.clamp(max=V - 1)
    vals = scores.gather(1, inside)
    if n * chunk < V:  # columns past the end (the partial chunk's padding) never win over a real one
        vals = vals.masked_fill(cols >= V, float("-inf"))
    top_v, j = torch.topk(vals, k, dim=1)
    return top_v, inside.gather(1, j)

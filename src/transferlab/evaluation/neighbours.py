"""Pairs of images whose embeddings point the same way (cosine similarity above a threshold).

Exact and exhaustive: every pair is compared, but only one `block` x `block` tile of similarities exists
at a time, so N images of D-dimensional features cost O(N² D) multiply-adds and O(N D + block²) memory,
never an N x N matrix. At 100 000 images that is 5e9 dot products: one matrix multiply per tile, on the
GPU when there is one. The kept pairs are bounded too (`max_pairs`, the most similar).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BLOCK", "similar_pairs"]

BLOCK = 4096  # a 4096 x 4096 float32 tile is 64 MiB


@torch.no_grad()
def similar_pairs(features, threshold: float, *, block: int = BLOCK, max_pairs: int = 100_000,
                  device: str = "cpu") -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity) with i < j for every pair of rows of `features` [N, D] at or above
    `threshold`, most similar first; at most `max_pairs` of them (the most similar)."""
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=1).to(device)
    n = len(x)
    kept_i: list[torch.Tensor] = []
    kept_j: list[torch.Tensor] = []
    kept_s: list[torch.Tensor] = []
    held = 0
    for a in range(0, n, block):
        rows = x[a:a + block]
        for b in range(a, n, block):
            sims = rows @ x[b:b + block].T
            if b == a:  # the diagonal tile: each pair once (i < j), never an image with itself
                sims = sims.triu(diagonal=1) - torch.tril(torch.full_like(sims, 2.0))
            i, j = (sims >= threshold).nonzero(as_tuple=True)
            if len(i):
                kept_i.append((i + a).cpu())
                kept_j.append((j + b).cpu())
                kept_s.append(sims[i, j].cpu())
                held += len(i)
            if held > 2 * max_pairs:  # keep memory bounded: only the most similar survive
                kept_i, kept_j, kept_s = _most_similar(kept_i, kept_j, kept_s, max_pairs)
                held = max_pairs
    if not kept_s:
        return []
    (i_all,), (j_all,), (s_all,) = _most_similar(kept_i, kept_j, kept_s, max_pairs)
    return [(int(i), int(j), float(s)) for i, j, s in zip(i_all.tolist(), j_all.tolist(), s_all.tolist())]


def _most_similar(i: list[torch.Tensor], j: list[torch.Tensor], s: list[torch.Tensor], k: int):
    """The k most similar pairs, most similar first (ties in index order), as one-element lists."""
    ii, jj, ss = torch.cat(i), torch.cat(j), torch.cat(s)
    order = np.lexsort((jj.numpy(), ii.numpy(), -ss.double().numpy()))[:k]
    order = torch.from_numpy(order)
    return [ii[order]], [jj[order]], [ss[order]]

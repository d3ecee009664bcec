"""Approximate top-K for large catalogues: a faiss HNSW index over the item vectors.

Exact retrieval reads every item vector per batch (``top_k_dot``); past about a million items
that is the retriever's whole budget. An HNSW graph visits a few thousand vectors per query
instead. faiss (Meta, ``faiss-cpu`` wheels on PyPI) is used rather than a hand-written index:
it has inner-product HNSW with SIMD distance kernels, adjustable search effort per call, batch
search that releases the GIL, and years of production use. ``bench/retrieval.py`` measures
its recall@10 against exact search and its speed on the same vectors.

Graph search needs a metric, and inner product is not one (an item is not its own nearest
neighbour when others have larger norms). The index therefore uses the standard reduction of
maximum inner product search to nearest neighbours: items become ``[x, sqrt(M² - |x|²)]`` with
``M`` the largest item norm, queries ``[q, 0]``, and the L2 order of those is exactly the
inner product order. Candidates are then rescored with the true inner products. At the same
search effort this reduction found more of the exact top-10 than an inner-product HNSW did
(docs/performance.md). Queries among the items (users near what they like) are easy; queries
far from every item need more effort (``ef_search``).

Excluded items (the user's history) cannot be skipped inside the graph search cheaply, so a
query fetches ``k + len(exclude)`` neighbours and drops the excluded ones; a row left with
fewer than ``k`` (a huge history) is reported so the caller can fall back to exact search.
"""

from __future__ import annotations

import numpy as np


class AnnIndex:
    """Maximum-inner-product HNSW index over ``(N, d)`` item vectors.

    Args:
        items: Item vectors; kept by reference for rescoring (the index holds its own copy).
        m: Graph degree (links per node): higher is more accurate, larger and slower to build.
        ef_construction: Search effort while building.
        ef_search: Search effort per query (at least the number of neighbours fetched).
    """

    def __init__(
        self, items: np.ndarray, m: int = 32, ef_construction: int = 80, ef_search: int = 256
    ) -> None:
        import faiss

        if items.ndim != 2 or len(items) == 0:
            raise ValueError(f"need a non-empty (items, dim) matrix, got shape {items.shape}")
        self.items = items
        x = np.asarray(items, dtype=np.float32)
        sq = np.einsum("ij,ij->i", x, x)
        extra = np.sqrt(np.maximum(sq.max() - sq, 0.0))[:, None]
        aug = np.ascontiguousarray(np.hstack([x, extra]), dtype=np.float32)
        self.index = faiss.IndexHNSWFlat(aug.shape[1], m, faiss.METRIC_L2)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(aug)
        self.ef_search = ef_search
        self.n_items = len(x)

    def search(
        self, users: np.ndarray, exclude: list[np.ndarray], k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate top-``k`` by inner product per row, excluded items removed.

        Returns:
            ``(B, k)`` indices (``-1`` pads), ``(B, k)`` exact scores of those items (``-inf``
            pads), and a ``(B,)`` bool mask of rows left with fewer than ``k`` items after
            exclusion (the caller searches those exactly).
        """
        import faiss

        u = np.asarray(users, dtype=np.float32)
        q = np.ascontiguousarray(np.hstack([u, np.zeros((len(u), 1), np.float32)]))
        extra = max((len(e) for e in exclude), default=0)
        fetch = min(self.n_items, k + extra)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        _, idx = self.index.search(q, fetch, params=params)
        out_i = np.full((len(u), k), -1, dtype=np.int64)
        out_s = np.full((len(u), k), -np.inf, dtype=np.float32)
        short = np.zeros(len(u), dtype=bool)
        for row, ex in enumerate(exclude):
            cand = idx[row][idx[row] >= 0]
            if len(ex):
                cand = cand[~np.isin(cand, ex)]
            scores = self.items[cand] @ u[row]
            order = np.argsort(-scores, kind="stable")[:k]
            out_i[row, : len(order)] = cand[order]
            out_s[row, : len(order)] = scores[order]
            short[row] = len(order) < min(k, self.n_items - len(ex))
        return out_i, out_s, short

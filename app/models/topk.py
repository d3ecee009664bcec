"""Top-k selection with one tie rule, for every ranking ScaleRec computes.

Evaluation, batch prediction, serving and quantised search all rank through this module, so a
user gets the same list wherever it is computed. The rule, for every input kind:

- Higher score first; equal scores go to the lower item index, also at the k-th place: which
  of several tied items makes the list is decided by index, never by the sort.
- NaN and -inf scores rank after every finite score (as the dtype's lowest finite value, which
  is also the score reported for them) but remain candidates.
- Excluded items are never returned. Slots a row cannot fill hold index -1 and score -inf.

``top_k`` ranks dense score matrices (numpy or torch), ``top_k_dot`` ranks the inner products
of query and item vectors without keeping a copy of them, and ``rank_candidates`` ranks
explicit candidate lists (the merge of blockwise or shortlisted searches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import scipy.sparse as sp
import torch

Exclude: TypeAlias = sp.spmatrix | sp.sparray | Sequence[np.ndarray] | None
"""Items never returned: a ``(rows, n_items)`` matrix whose non-zero entries are excluded, or
per row an array of item indices."""

CHUNK = 512
"""Scores per chunk in the chunked selection of wide rows."""


class TopK(NamedTuple):
    """Top-k lists, best first; unpacks as ``indices, scores = top_k(...)``."""

    indices: np.ndarray
    """``(rows, k)`` int64 item indices; -1 marks an empty slot."""
    scores: np.ndarray
    """``(rows, k)`` scores of those items (float, the input's precision); -inf when empty."""


def top_k(
    scores: np.ndarray | torch.Tensor, exclude: Exclude, k: int, *, overwrite: bool = False
) -> TopK:
    """The ``k`` best items of every row of a score matrix (see the module's tie rule).

    Wide rows are cut into chunks of ``CHUNK`` scores and only the k chunks with the largest
    maxima are searched (plus the ragged tail): every top-k item lies in one of them, so the
    result is exact, and a row of a million scores is never sorted.

    Args:
        scores: ``(rows, n_items)`` scores, numpy or torch (moved to CPU); integer scores are
            ranked as float64.
        exclude: Items never returned (a matrix of the scores' shape, or index arrays per row).
        k: List length (>= 1); rows with fewer candidates are padded.
        overwrite: Let ``top_k`` use ``scores`` as scratch space instead of copying it (for a
            fresh score matrix nobody reads afterwards).

    Returns:
        ``TopK`` of shape ``(rows, k)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = _working_copy(scores, overwrite)
    n_rows, n_items = s.shape
    rows, cols = _excluded_pairs(exclude, n_rows, n_items)
    kk = min(k, n_items)
    if n_rows == 0 or kk == 0:
        return _ranked(np.zeros((n_rows, 0), np.int64), np.zeros((n_rows, 0), _np_dtype(s)), k)
    if len(rows):
        s[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
    lowest = float(torch.finfo(s.dtype).min)
    cand_cols = _candidate_columns(s, kk)
    cand = s if cand_cols is None else s.gather(1, cand_cols)
    _nan_to_lowest(cand)
    pos = _select(cand, kk)
    idx = pos if cand_cols is None else cand_cols.gather(1, pos)
    vals = cand.gather(1, pos)
    # -inf marks excluded items and -inf scores alike: rows whose list reaches the lowest
    # values are redone on whole rows with -inf scores as the lowest finite value (rare: a
    # full pass to tell them apart up front would cost every row).
    short = torch.nonzero(vals.amin(dim=1) <= lowest).flatten()
    if len(short):
        sub = s[short]
        torch.nan_to_num_(sub, nan=lowest, posinf=float("inf"), neginf=lowest)
        mine = np.isin(rows, short.numpy())
        local = np.searchsorted(short.numpy(), rows[mine])
        sub[torch.from_numpy(local), torch.from_numpy(cols[mine])] = float("-inf")
        sub_pos = _select(sub, kk)
        idx[short] = sub_pos
        vals[short] = sub.gather(1, sub_pos)
    return _ranked(idx.numpy(), vals.numpy(), k)


def top_k_dot(
    queries: np.ndarray,
    items: np.ndarray | torch.Tensor,
    exclude: Exclude,
    k: int,
    *,
    out: np.ndarray | None = None,
) -> TopK:
    """Exact ``top_k(queries @ itemsᵀ, exclude, k)``, ranking the product in place.

    The product goes through numpy's BLAS. Store the items column-major (``item_matrix``):
    ``itemsᵀ`` is then a C-contiguous ``(d, N)`` matrix, which BLAS multiplies faster than
    row-major items and faster than ``torch.matmul`` on either layout, most of all for a single
    query.

    Args:
        queries: ``(rows, d)`` query (user) vectors.
        items: ``(N, d)`` item vectors, ideally from ``item_matrix``.
        exclude: Items never returned (see ``top_k``).
        k: List length.
        out: Scratch for the product, overwritten: a writable C-contiguous array of the items'
            dtype with ``N`` columns and at least ``rows`` rows. A caller ranking many batches
            passes one buffer to all, so no fresh score matrix is allocated and paged in per call.
    """
    v = items.numpy() if isinstance(items, torch.Tensor) else np.asarray(items)
    u = np.ascontiguousarray(queries, dtype=v.dtype)
    if out is None:
        return top_k(u @ v.T, exclude, k, overwrite=True)
    if (
        out.dtype != v.dtype
        or out.ndim != 2
        or out.shape[1] != len(v)
        or len(out) < len(u)
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writable C-contiguous {v.dtype} array of at least "
            f"({len(u)}, {len(v)}), got {out.dtype} {out.shape}"
        )
    return top_k(np.matmul(u, v.T, out=out[: len(u)]), exclude, k, overwrite=True)


def item_matrix(items: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, d)`` float32 item vectors in the layout ``top_k_dot`` scores fastest."""
    v = items.numpy() if isinstance(items, torch.Tensor) else items
    return np.asfortranarray(v, dtype=np.float32)


def rank_candidates(indices: np.ndarray, scores: np.ndarray, k: int) -> TopK:
    """The ``k`` best of explicit candidate lists, by the module's tie rule.

    Args:
        indices: ``(rows, c)`` item indices, distinct within a row; -1 marks an empty slot.
        scores: ``(rows, c)`` their scores; -inf also marks an empty slot (``top_k``'s output
            can be fed back as it is), NaN ranks as the lowest finite value.
        k: List length.
    """
    idx = np.asarray(indices, dtype=np.int64)
    s = np.array(scores, copy=True)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    s[np.isnan(s)] = np.finfo(s.dtype).min
    s[idx < 0] = -np.inf
    return _ranked(idx, s, k)


def _working_copy(scores: np.ndarray | torch.Tensor, overwrite: bool) -> torch.Tensor:
    """A writable, C-contiguous float CPU tensor of ``scores`` (the input itself if allowed)."""
    if isinstance(scores, torch.Tensor):
        t = scores.detach().cpu()
        if not t.is_floating_point():
            t = t.double()
        elif not overwrite:
            t = t.clone()
    else:
        a = np.asarray(scores)
        dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)
        if not overwrite or a.dtype != dtype or not a.flags.writeable:
            a = np.array(a, dtype=dtype, order="C", copy=True)
        t = torch.from_numpy(a)
    if t.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows x items), got shape {tuple(t.shape)}")
    return t.contiguous()


def _nan_to_lowest(s: torch.Tensor) -> None:
    """NaN -> the dtype's lowest finite value, in place; infinities are kept."""
    lowest = float(torch.finfo(s.dtype).min)
    torch.nan_to_num_(s, nan=lowest, posinf=float("inf"), neginf=float("-inf"))


def _np_dtype(t: torch.Tensor) -> np.dtype:
    return torch.empty(0, dtype=t.dtype).numpy().dtype


def _excluded_pairs(exclude: Exclude, n_rows: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) index arrays of the excluded entries."""
    if exclude is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if isinstance(exclude, sp.spmatrix | sp.sparray):
        if exclude.shape != (n_rows, n_items):
            raise ValueError(f"exclude has shape {exclude.shape}, scores {(n_rows, n_items)}")
        ex = sp.csr_matrix(exclude)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(ex.indptr))
        stored = ex.data != 0  # explicit zeros are not exclusions
        return rows[stored], ex.indices[stored].astype(np.int64)
    if len(exclude) != n_rows:
        raise ValueError(f"exclude has {len(exclude)} rows, scores {n_rows}")
    lens = [len(e) for e in exclude]
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lens)
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) if n_rows else rows
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"exclude holds item indices outside [0, {n_items})")
    return rows, cols


def _candidate_columns(s: torch.Tensor, k: int) -> torch.Tensor | None:
    """Ascending columns per row that hold all of its top k, or None to search whole rows.

    Chunks are ranked by (maximum descending, chunk number ascending), the order of their best
    items under the tie rule; a chunk outside the first k has k better items in other chunks,
    so it holds none of the top k. The tail past the last whole chunk is always kept.
    """
    n_rows, n = s.shape
    n_chunks = n // CHUNK
    if n_chunks <= 2 * k:  # small rows: nothing to skip
        return None
    maxima = s[:, : n_chunks * CHUNK].reshape(n_rows, n_chunks, CHUNK).amax(dim=2)
    if bool(torch.isnan(maxima).any()):  # amax propagates NaN, which topk would rank first
        _nan_to_lowest(s)
        maxima = s[:, : n_chunks * CHUNK].reshape(n_rows, n_chunks, CHUNK).amax(dim=2)
    best = _select(maxima, k).sort(dim=1).values
    offsets = torch.arange(CHUNK, dtype=torch.int64)
    cols = (best[:, :, None] * CHUNK + offsets).reshape(n_rows, k * CHUNK)
    tail = torch.arange(n_chunks * CHUNK, n, dtype=torch.int64).expand(n_rows, -1)
    return torch.cat([cols, tail], dim=1)


def _select(s: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest values per row, ties to the lower position (unordered).

    ``torch.topk`` picks arbitrary items among values tied at the k-th place; only rows where
    it left some of them out are redone exactly, from a comparison with the k-th value.
    """
    vals, pos = torch.topk(s, k, dim=1, sorted=False)
    kth = vals.amin(dim=1, keepdim=True)
    # Every value above the k-th is selected, so ties were left out iff more than k are >= it.
    left_out = (s >= kth).sum(dim=1) > k
    if bool(left_out.any()):
        fix = torch.nonzero(left_out).flatten()
        sub, t = s[fix], kth[fix]
        eq = sub == t
        need = k - (sub > t).sum(dim=1, keepdim=True)
        take = (sub > t) | (eq & (torch.cumsum(eq, dim=1) <= need))
        # nonzero walks row-major: each row's k positions, ascending.
        pos[fix] = torch.nonzero(take)[:, 1].reshape(len(fix), k)
    return pos


def _ranked(idx: np.ndarray, vals: np.ndarray, k: int) -> TopK:
    """The best ``k`` of candidates without NaN, ordered and padded; -inf slots are empty."""
    # lexsort: the last key is primary (score, descending), then item index ascending.
    order = np.lexsort((idx, -vals), axis=1)[:, :k]
    idx = np.take_along_axis(idx, order, 1)
    vals = np.take_along_axis(vals, order, 1)
    if idx.shape[1] < k:
        pad = ((0, 0), (0, k - idx.shape[1]))
        idx = np.pad(idx, pad, constant_values=-1)
        vals = np.pad(vals, pad, constant_values=-np.inf)
    idx[np.isneginf(vals)] = -1
    return TopK(idx, vals)

"""Ranker deployment of the serving stage: business rules on the retriever's candidates.

Honest scope: it does not re-score with a second model. It removes blocked items and applies a
per-genre diversity cap (greedy: walk the candidates best first, defer an item whose genre is
already at ``max_per_genre``, fill from the deferred ones if the list would run short). Scores
are the retriever's. The ingress skips this hop when neither rule is configured.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from ray import serve

from app.serve.retriever import Candidates
from app.store import ITEM_ID, ITEM_IDX, Lake, get_record, load_dataset


def rerank(
    cand: Candidates, k: int, genres: list[list[str]], blocked: set[int], max_per_genre: int
) -> Candidates:
    """Apply the blocked-item filter and the genre cap to one candidate list; keep ``k``."""
    picked: list[int] = []
    deferred: list[int] = []
    per_genre: Counter[str] = Counter()
    for pos, item in enumerate(cand.items.tolist()):
        if item in blocked:
            continue
        gs = genres[item] if item < len(genres) else []
        if max_per_genre > 0 and any(per_genre[g] >= max_per_genre for g in gs):
            deferred.append(pos)
            continue
        per_genre.update(gs)
        picked.append(pos)
        if len(picked) == k:
            break
    pos_arr = np.asarray((picked + deferred)[:k], dtype=np.int64)
    return Candidates(cand.version, cand.items[pos_arr], cand.scores[pos_arr])


class RankRules:
    """The ranker's rules with each model version's item genres and blocked items.

    Shared by the ``Ranker`` deployment and an ingress that ranks in its own replica
    (``colocate_scoring``).
    """

    def __init__(self, lake: Lake, name: str, max_per_genre: int, blocked_items: list[str]) -> None:
        self.lake = lake
        self.name = name
        self.max_per_genre = max_per_genre
        self.blocked_ids = set(blocked_items)
        self._catalogues: dict[str, tuple[list[list[str]], set[int]]] = {}

    def _catalogue(self, version: str) -> tuple[list[list[str]], set[int]]:
        if version not in self._catalogues:
            info = get_record(self.lake, self.name, version).lineage["dataset"]
            ds = load_dataset(self.lake, info["name"], info["version"])
            items = ds.items()
            ids = [str(i) for i in items.column(ITEM_ID).to_pylist()]
            idx = items.column(ITEM_IDX).to_numpy()
            genres = ds.item_genres() or [[] for _ in range(ds.n_items)]
            blocked = {int(i) for i, iid in zip(idx, ids, strict=True) if iid in self.blocked_ids}
            if len(self._catalogues) >= 2:  # the served version and the previous one
                self._catalogues.pop(next(iter(self._catalogues)))
            self._catalogues[version] = (genres, blocked)
        return self._catalogues[version]

    def rank(self, candidates: list[Candidates], ks: list[int]) -> list[Candidates]:
        """Rerank each candidate list to its ``k``."""
        out = []
        for cand, k in zip(candidates, ks, strict=True):
            genres, blocked = self._catalogue(cand.version)
            out.append(rerank(cand, k, genres, blocked, self.max_per_genre))
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Ranker:
    """Blocked-item filter and genre diversity cap over retrieved candidates."""

    def __init__(self, lake: Lake, name: str, max_per_genre: int, blocked_items: list[str]) -> None:
        self.rules = RankRules(lake, name, max_per_genre, blocked_items)

    def rank(self, candidates: list[Candidates], ks: list[int]) -> list[Candidates]:
        """Rerank each candidate list to its ``k``."""
        return self.rules.rank(candidates, ks)

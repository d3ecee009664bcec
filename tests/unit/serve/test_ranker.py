"""The ranker's rules: blocked items never come back, a genre fills at most its cap."""

from __future__ import annotations

import numpy as np

from app.serve import Candidates, rerank
from app.serve.ranker import RankRules


def test_rerank_blocks_and_caps_genres() -> None:
    cand = Candidates("v", np.arange(6), np.linspace(1, 0, 6).astype(np.float32))
    genres = [["a"], ["a"], ["a"], ["b"], ["b"], ["c"]]
    out = rerank(cand, 4, genres, blocked={1}, max_per_genre=1)
    assert out.items.tolist() == [0, 3, 5, 2]  # 1 blocked; 2 and 4 deferred; 2 fills the list


def test_rules_read_genres_and_blocked_ids_of_the_models_dataset(serve_lake) -> None:
    rules = RankRules(serve_lake.lake, serve_lake.name, max_per_genre=2, blocked_items=["i1"])
    version = serve_lake.versions[0]
    cand = Candidates(version, np.arange(16), np.linspace(1, 0, 16).astype(np.float32))
    (out,) = rules.rank([cand], [5])
    # items 0..11 are genre g0, 12..15 g1: i1 blocked, two of each genre, then the first deferred
    assert out.items.tolist() == [0, 2, 12, 13, 3]
    assert out.version == version

"""Recommender models: one interface, closed-form and torch families, ranking, quantisation.

No Ray and no lake here: stages and serving build (``build_model``), fit (``Recommender.fit``
or a distributed loop around ``run_epoch``), rank (``top_k``) and compress (``quantize``)
models through this package.
"""

from app.models.base import Recommender, sequence_ranks
from app.models.closed_form import EASE, EDLAE, Popularity, recency_weighted
from app.models.factory import MODELS, build_model, restore_model
from app.models.neural import (
    MatrixFactorization,
    TorchRecommender,
    TwoTower,
    keep_freed_heap,
    run_epoch,
)
from app.models.quantize import (
    QUANTIZE_MODES,
    CompressError,
    EmbeddingTable,
    QuantizedRecommender,
    dequantize_rows,
    quantize,
    quantize_rows,
    quantized_builder,
    state_nbytes,
)
from app.models.sequential import SequenceAutoencoder
from app.models.sync import GradientSync
from app.models.topk import Exclude, TopK, item_matrix, rank_candidates, top_k, top_k_dot

__all__ = [
    "EASE",
    "EDLAE",
    "MODELS",
    "QUANTIZE_MODES",
    "CompressError",
    "EmbeddingTable",
    "Exclude",
    "GradientSync",
    "MatrixFactorization",
    "Popularity",
    "QuantizedRecommender",
    "Recommender",
    "SequenceAutoencoder",
    "TopK",
    "TorchRecommender",
    "TwoTower",
    "build_model",
    "dequantize_rows",
    "item_matrix",
    "keep_freed_heap",
    "quantize",
    "quantize_rows",
    "quantized_builder",
    "rank_candidates",
    "recency_weighted",
    "sequence_ranks",
    "restore_model",
    "run_epoch",
    "state_nbytes",
    "top_k",
    "top_k_dot",
]

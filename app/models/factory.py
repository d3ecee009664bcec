"""Model families by name: build an unfitted model from config, or restore a fitted one.

``build_model`` turns a ``ModelArgs`` section into a model sized by a dataset's id maps;
``restore_model`` rebuilds a fitted model from what the registry stores (family, sizes,
``hparams()`` and ``state_dict()``).
"""

from __future__ import annotations

from typing import Any

import torch

from app.config import ModelArgs
from app.models.base import Recommender
from app.models.closed_form import EASE, EDLAE, Popularity
from app.models.neural import MatrixFactorization, TwoTower
from app.models.sequential import SequenceAutoencoder

MODELS: dict[str, type[Recommender]] = {
    m.family: m
    for m in (Popularity, EASE, EDLAE, MatrixFactorization, TwoTower, SequenceAutoencoder)
}


def build_model(
    args: ModelArgs,
    n_users: int,
    n_items: int,
    item_genres: list[list[str]] | None = None,
    seed: int = 0,
) -> Recommender:
    """Build an unfitted model of family ``args.name`` for a catalogue.

    Args:
        args: The ``model`` config section.
        n_users: Users in the dataset version.
        n_items: Items in the dataset version.
        item_genres: Per item, its genres (two-tower item features).
        seed: Initialisation seed; the same seed gives the same weights.
    """
    name = args.name
    if name == "popularity":
        return Popularity(n_users, n_items)
    if name == "ease":
        return EASE(n_users, n_items, args.ease_lambda, args.ease_max_items)
    if name == "edlae":
        return EDLAE(
            n_users,
            n_items,
            edlae_lambda=args.edlae_lambda,
            dropout=args.edlae_dropout,
            zero_diagonal=args.edlae_zero_diagonal,
            recency_tau=args.recency_tau,
            max_items=args.ease_max_items,
        )
    if name == "seq_ae":
        return SequenceAutoencoder(
            n_users,
            n_items,
            embed_dim=args.embed_dim,
            recency_tau=args.recency_tau,
            input_dropout=args.history_dropout,
            window=args.seq_window,
            cuts_per_user=args.seq_cuts,
            min_cut=args.seq_min_cut,
            seed=seed,
        )
    kw: dict[str, Any] = {
        "embed_dim": args.embed_dim,
        "loss": args.loss,
        "num_negatives": args.num_negatives,
        "temperature": args.temperature,
        "l2": args.l2,
        "logq": args.logq,
        "seed": seed,
    }
    if name == "mf":
        return MatrixFactorization(
            n_users, n_items, use_bias=args.use_bias, normalize=args.normalize, **kw
        )
    if name == "two_tower":
        return TwoTower(
            n_users, n_items, item_genres=item_genres, history_dropout=args.history_dropout, **kw
        )
    raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(MODELS)}")


def restore_model(
    family: str, n_users: int, n_items: int, hparams: dict[str, Any], state: dict[str, torch.Tensor]
) -> Recommender:
    """Rebuild a fitted model from its family, sizes, ``hparams()`` and ``state_dict()``."""
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(MODELS)}")
    model = MODELS[family](n_users, n_items, **hparams)  # type: ignore[call-arg]
    model.load_state_dict(state)
    return model

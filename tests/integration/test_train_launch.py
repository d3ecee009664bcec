"""Ray Train stages launched the way a user launches them: from a folder, with a relative lake."""

from __future__ import annotations

from pathlib import Path

from app.config import load_config
from app.store import Lake, aliases
from app.train import dataset_for, run


def test_ray_train_stage_with_a_relative_lake(ray_cluster, tiny_dataset, tmp_path, monkeypatch):
    # Ray Train workers run in their own folder: a lake left relative would resolve there.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "lake=./lake",
            "data.name=tiny",
            "data.source=synthetic",
            "model.name=mf",
            "model.embed_dim=8",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",
            "train.epochs=2",
            "train.batch_size=64",
            "train.refit_final=false",
        ],
    )
    assert cfg.lake == str(tmp_path / "lake") == tiny_dataset.lake.uri
    record = run(cfg, dataset_for(Lake(cfg.lake), cfg.data, seed=cfg.seed))
    assert record.lineage["dataset"]["version"] == tiny_dataset.version
    assert aliases(tiny_dataset.lake, "tiny-mf")["staging"] == record.version
    runs = Path(tmp_path / "lake" / "runs")
    assert any(runs.iterdir()), "checkpoints go to <lake>/runs, not to the workers' folder"

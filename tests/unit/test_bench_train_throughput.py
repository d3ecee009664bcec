from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config import ModelArgs
from app.train import fit_splits, with_train
from bench import train_throughput as tt


def _variant(name: str, rates: list[int], **extra) -> dict:
    epochs = [
        {"epoch": i + 1, "seconds": 1_000 / r, "interactions": 1_000, "interactions_per_s": r}
        for i, r in enumerate(rates)
    ]
    return {"variant": name, "rows_per_step": 1024, "epochs": epochs, **extra}


def test_bench_config_sets_the_workload_and_keeps_user_overrides(tmp_path: Path) -> None:
    cfg = tt.bench_config(500_000, tmp_path, 2, None, ["model.embed_dim=32", "train.lr=0.01"])
    assert cfg.data.source == "synthetic"
    assert cfg.data.synthetic.n_interactions == 500_000
    assert (cfg.data.synthetic.n_users, cfg.data.synthetic.n_items) == (5_000, 1_000)
    assert cfg.lake == str(tmp_path / "lake")
    assert (cfg.model.name, cfg.model.embed_dim, cfg.train.lr) == ("mf", 32, 0.01)
    assert cfg.train.refit and cfg.train.epochs == 2 and cfg.train.cpus_per_worker < 1
    assert fit_splits(cfg.train) == ("train", "valid")


def test_plain_loop_sees_every_row_once_per_epoch_and_learns(tiny_dataset) -> None:
    cfg = tt.bench_config(1_000, Path("/unused"), 3, None, ["train.batch_size=64"])
    cfg = cfg.model_copy(
        update={"model": ModelArgs(name="mf", embed_dim=16, num_negatives=10_000, temperature=0.2)}
    )
    cfg = with_train(cfg, refit=False)
    users, items = tt.interaction_tensors(tiny_dataset, ("train",))
    rec = tt.plain_model(cfg, tiny_dataset)
    epochs = tt.plain_epochs(rec, users, items, 64, 0.02, 3)
    assert [e["interactions"] for e in epochs] == [len(users)] * 3
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert all(0.0 <= sum(e["step_split"].values()) <= 1.01 for e in epochs)  # rounded


def test_run_plain_reports_threads_parameters_and_the_sparse_gradient(tiny_dataset) -> None:
    overrides = ["model.embed_dim=8", "model.num_negatives=16"]  # sampled: 16 < 48 items
    cfg = tt.bench_config(1_000, Path("/unused"), 1, None, overrides)
    threads = torch.get_num_threads()
    try:
        out = tt.run_plain(cfg, tiny_dataset, 1, tt.PLAIN_1T)
    finally:
        torch.set_num_threads(threads)
    assert out["variant"] == tt.PLAIN_1T and out["torch_threads"] == 1
    assert out["parameters"] == (tiny_dataset.n_users + tiny_dataset.n_items) * 8
    assert out["epochs"][0]["interactions"] == tiny_dataset.csr("train", "valid").nnz
    assert set(out["epochs"][0]["step_split"]) == {"batching", "forward_backward", "optimizer"}
    # Sampled softmax: both tables are read row by row, nothing is dense.
    grad = out["gradient"]
    assert grad["dense_floats"] == 0
    assert {t["param"] for t in grad["sparse_tables"]} == {"user_emb.weight", "item_emb.weight"}
    users = next(t for t in grad["sparse_tables"] if t["param"] == "user_emb.weight")
    assert users["table_rows"] == tiny_dataset.n_users and users["dim"] == 8
    assert 0 < users["rows"] <= min(cfg.train.batch_size, tiny_dataset.n_users)
    assert grad["floats_per_step"] == sum(t["rows"] * t["dim"] for t in grad["sparse_tables"])


def test_gradient_layout_keeps_the_item_table_dense_under_the_exact_softmax(tiny_dataset) -> None:
    overrides = ["model.embed_dim=4", "model.num_negatives=100000", "model.use_bias=true"]
    cfg = tt.bench_config(1_000, Path("/unused"), 1, None, overrides)
    rec = tt.plain_model(cfg, tiny_dataset)
    users, items = tt.interaction_tensors(tiny_dataset, ("train",))
    grad = tt.gradient_layout(rec, users, items, 16)
    assert grad["dense_floats"] == tiny_dataset.n_items * 5  # item table + bias
    assert [t["param"] for t in grad["sparse_tables"]] == ["user_emb.weight"]
    assert all(p.grad is None for p in rec.module.parameters())


def test_summarise_ratios_against_plain_1t_plain_and_best_plain() -> None:
    variants = [
        _variant("plain", [1_000, 3_000, 2_000]),  # median 2000
        _variant("plain_1t", [4_000]),
        _variant("ray_1w", [3_600]),
        _variant("ray_2w", [5_000]),
    ]
    s = tt.summarise(variants)
    assert s["interactions_per_s"]["plain"] == 2_000
    assert s["ratios"]["ray_1w_vs_plain_1t"] == pytest.approx(0.9)
    assert s["ratios"]["ray_2w_vs_plain_1t"] == pytest.approx(1.25)
    assert s["ratios"]["ray_2w_vs_plain"] == pytest.approx(2.5)
    assert s["ratios"]["ray_2w_vs_best_plain"] == pytest.approx(1.25)
    assert s["targets"]["ray_1w_vs_plain_1t"] == {"measured": 0.9, "target": ">= 0.9", "met": True}
    assert s["targets"]["ray_2w_vs_plain_1t"]["met"] is False  # 1.25 < 1.3
    assert not s["targets_met"]
    faster = tt.summarise(variants[:3] + [_variant("ray_2w", [5_200])])
    assert faster["targets_met"]


def test_time_to_quality_uses_the_first_point_at_the_target() -> None:
    def curve(values: list[float], step_s: float) -> list[dict]:
        return [
            {"step": i + 1, "train_s": step_s * (i + 1), tt.VALID_METRIC: v}
            for i, v in enumerate(values)
        ]

    als = {"unit": "iteration", "curve": curve([0.05, 0.08, 0.10, 0.09], 0.5)}
    mf = {"unit": "epoch", "curve": curve([0.02, 0.06, 0.096, 0.11], 10.0)}
    s = tt.summarise_quality(mf, als, 0.95)
    assert s["target"][tt.VALID_METRIC] == pytest.approx(0.095)
    assert s["implicit_als"]["reached_target"] == {"step": 3, "train_s": 1.5}
    assert s["scalerec_mf"]["reached_target"] == {"step": 3, "train_s": 30.0}
    assert s["scalerec_mf"]["best_at_epoch"] == 4
    assert s["time_to_target_ratio_mf_over_als"] == pytest.approx(20.0)
    assert tt.time_to_target(mf["curve"], 0.5) is None
    assert tt.parse_args([]).quality_fraction == 1.0  # by default: all of ALS's best


def test_table_and_notes_render_a_result() -> None:
    plain_1t = _variant(
        "plain_1t", [3_000], torch_threads=1, parameters=1_000, loadavg_1m_before_after=[5.0, 6.0]
    )
    plain_1t["epochs"][0] |= {
        "ms_per_step": 10.0,
        "step_split": {"batching": 0.01, "forward_backward": 0.6, "optimizer": 0.3},
    }
    plain_1t["gradient"] = {
        "dense_floats": 40,
        "floats_per_step": 104,
        "sparse_tables": [{"param": "user_emb.weight", "rows": 16, "table_rows": 90, "dim": 4}],
    }
    variants = [
        plain_1t,
        _variant("plain", [2_000], torch_threads=2),
        _variant("ray_1w", [2_850], setup_s=5.0),
        _variant("ray_2w", [4_200], setup_s=6.0),
    ]
    variants[-1]["rows_per_step"] = 2048
    result = {
        "variants": variants,
        "summary": tt.summarise(variants),
        "ray": {"startup_s": 3.0},
        "probes": {
            "gloo_allreduce_2_ranks": {
                "megabytes_per_step": 0.01,
                "ms_per_step": 0.5,
                "dense_megabytes": 1.0,
                "dense_ms_per_step": 2.0,
            },
            "ray_data_iter_torch_batches": {"rows_per_s": 420_000},
        },
        "machine": {"cpu_count": 2, "loadavg_before": [5.0], "loadavg_after": [6.0]},
    }
    text = tt.table(result)
    assert "ray_1w_vs_plain_1t: 0.95 (target >= 0.9): met" in text
    assert "ray_2w_vs_plain_1t: 1.4 (target >= 1.3): met" in text
    assert "ray_2w" in text and "1.40" in text
    joined = " ".join(tt.notes(result))
    assert "faster on 1 torch thread" in joined and "plain_1t 5.0→6.0" in joined
    assert "1,000 parameters" in joined and "user_emb.weight 16 of 90 rows" in joined
    assert "0.5 ms" in joined and "2.0 ms per step" in joined
    assert "100x the fastest training rate" in joined


@pytest.mark.slow
def test_allreduce_probe_times_the_sparse_sync_and_the_dense_one() -> None:
    gradient = {
        "dense_floats": 100,
        "floats_per_step": 100 + 8 * 4,
        "sparse_tables": [{"param": "user_emb.weight", "rows": 8, "table_rows": 50, "dim": 4}],
    }
    out = tt.allreduce_probe(gradient, 1_000, steps=2)
    assert out["floats_per_step"] == 132 and out["dense_floats"] == 1_000
    assert out["ms_per_step"] > 0 and out["dense_ms_per_step"] > 0


def test_another_familys_run_lands_beside_mf_and_survives_mf_reruns(tmp_path):
    out = tmp_path / "tt.json"

    def run(name: str, rate: int) -> dict:
        return {"workload": {"model": {"name": name}}, "summary": {"interactions_per_s": rate}}

    out.write_text(json.dumps(tt.merged(run("mf", 10), out)))
    out.write_text(json.dumps(tt.merged(run("seq_ae", 3), out)))
    file = json.loads(out.read_text())
    assert file["summary"]["interactions_per_s"] == 10  # MF's, at the top
    assert file["summary"]["seq_ae"] == {"interactions_per_s": 3}
    assert file["by_model"]["seq_ae"]["workload"]["model"]["name"] == "seq_ae"
    again = tt.merged(run("mf", 11), out)  # a later MF run keeps the sequence model's
    assert again["summary"]["interactions_per_s"] == 11
    assert again["summary"]["seq_ae"] == {"interactions_per_s": 3}
    assert "seq_ae" in again["by_model"]

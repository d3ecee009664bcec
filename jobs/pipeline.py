"""The whole ScaleRec pipeline on one Ray cluster (what `make run` runs).

Run: python -m jobs.pipeline --config jobs/configs/synthetic.yaml

Ingest → train (Ray Train) → register → evaluate on test → compare with baselines → promote
→ serve over HTTP (``serve.after_pipeline``: serve until Ctrl-C, ``sample`` to exit after one
answer, ``skip``).
"""

from __future__ import annotations

from app import cluster, data, evaluate, registry, train
from app.config import config_from_cli
from app.dataset import load_dataset
from app.lake import Lake


def main(argv: list[str] | None = None) -> None:
    """Run every stage in order, printing a summary of each."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ds = data.run(cfg.data, cfg.lake, seed=cfg.seed)
    print(data.summary_table(ds.manifest))
    record = train.run(cfg)
    print(f"registered {record.name} version {record.version}")
    metrics = evaluate.run(cfg, record.version)
    ds = load_dataset(cfg.lake, ds.name, ds.version)
    ours = {"model": f"{cfg.model.name} (ScaleRec, {record.version})", **metrics}
    baselines = evaluate.baselines(ds)
    print(f"\ntest metrics, full ranking over {ds.n_items:,} items ({ds.name} {ds.version}):")
    print(evaluate.metrics_table([ours, *baselines]))
    print(evaluate.margin_line(ours, baselines))
    if cfg.serve.after_pipeline == "skip":
        return
    try:
        registry.promote(
            Lake(cfg.lake), record.name, record.version, "production", reason="make run"
        )
    except registry.PromotionRefused as exc:
        print(f"not promoted: {exc}; serving it anyway by version")
    from app.serve.deploy import load_serve_config, run

    overrides = [f"lake={cfg.lake}", f"name={record.name}", f"model={record.version}"]
    overrides += [f"{k}={getattr(cfg.serve, k)}" for k in ("host", "port", "cache_size")]
    run(load_serve_config(cfg.serve.config, overrides), cfg.serve.after_pipeline == "sample")


if __name__ == "__main__":
    cluster.run_job(main)

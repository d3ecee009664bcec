"""The whole ScaleRec pipeline on one Ray cluster (what `make run` runs).

Run: python -m jobs.pipeline --config jobs/configs/synthetic.yaml

Ingest → train (Ray Train) → register → evaluate on test → compare with baselines → promote
→ serve over HTTP (``serve.after_pipeline``: serve until Ctrl-C, ``sample`` to exit after one
answer, ``skip``).
"""

from __future__ import annotations

from app import cluster, evaluate, ingest, train
from app.cli import config_from_cli
from app.store import Lake, PromotionRefused, promote


def main(argv: list[str] | None = None) -> None:
    """Run every stage in order, printing a summary of each."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    lake = Lake(cfg.lake)
    ds = ingest.run(cfg.data, lake, seed=cfg.seed, events=cfg.serve.events)
    print(ingest.summary_table(ds.manifest))
    record = train.run(cfg, ds)
    print(f"registered {record.name} version {record.version}")
    metrics = evaluate.run(lake, record.name, record.version)
    ours = {"model": f"{cfg.model.name} (ScaleRec, {record.version})", **metrics}
    baselines = evaluate.baselines(ds)
    print(f"\ntest metrics, full ranking over {ds.n_items:,} items ({ds.name} {ds.version}):")
    print(evaluate.metrics_table([ours, *baselines]))
    print(evaluate.margin_line(ours, baselines))
    if cfg.serve.after_pipeline == "skip":
        return
    try:
        promote(lake, record.name, record.version, "production", reason="make run")
    except PromotionRefused as exc:
        print(f"not promoted: {exc}; serving it anyway by version")
    from app.serve import pipeline_serve_config, run

    serve_cfg = pipeline_serve_config(cfg.serve, lake, record.name, record.version)
    run(serve_cfg, exit_after_sample=cfg.serve.after_pipeline == "sample")


if __name__ == "__main__":
    cluster.run_job(main)

"""The HTML report of a lake built without Ray: every section, its images, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray

from app.config import AppConfig, ModelArgs
from app.evaluate import evaluate_model, validation_metrics
from app.models import build_model
from app.monitoring import ReportError, build_report, pick_model
from app.monitoring.report import loadtest_section
from app.store import DatasetVersion, Lake, ModelRecord, register, update_metrics
from app.tune import TrialRow
from jobs import report as report_job
from jobs.loadtest import summarize

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _register(ds: DatasetVersion, family: str, lineage: dict | None = None, **kw) -> ModelRecord:
    """Fit a closed-form model on train, register it with its validation and test metrics."""
    args = ModelArgs(name=family, **kw)
    model = build_model(args, ds.n_users, ds.n_items).fit(ds.csr("train"))
    valid = validation_metrics(model, ds.csr("train"), ds.csr("valid"))
    cfg = AppConfig.model_validate(
        {
            "lake": ds.lake.uri,
            "data": {"name": ds.name, "source": "synthetic"},
            "model": args.model_dump(),
        }
    )
    rec = register(ds.lake, f"{ds.name}-{family}", model, cfg, ds, valid, lineage)
    test = evaluate_model(model, ds.csr("train", "valid"), ds.csr("test"))
    # the keys app.evaluate.run stores
    update_metrics(ds.lake, rec.name, rec.version, {k: v for k, v in test.items() if k != "users"})
    return rec


def _search(ds: DatasetVersion, lambdas: list[float]) -> dict:
    """A search history as app.tune.run stores it in the lineage: one EASE fit per trial."""
    rows = []
    for i, lam in enumerate(lambdas):
        model = build_model(ModelArgs(name="ease", ease_lambda=lam), ds.n_users, ds.n_items)
        model.fit(ds.csr("train"))
        ndcg = validation_metrics(model, ds.csr("train"), ds.csr("valid"))["valid_ndcg@10"]
        rows.append(TrialRow(f"trial_{i:05d}", {"model.ease_lambda": lam}, ndcg, 1, 1, "done"))
    rows.sort(key=lambda r: -(r.best_valid_ndcg or 0.0))
    return {
        "searcher": "random",
        "scheduler": "ASHA",
        "metric": "valid_ndcg@10",
        "best_trial": rows[0].trial_id,
        "wall_s": 1.0,
        "trials": [r.__dict__ for r in rows],
    }


@pytest.fixture
def full_lake(tiny_dataset: DatasetVersion, tmp_path: Path) -> tuple[Lake, Path]:
    """The tiny dataset, a popularity model and a tuned EASE model (newest), and a load test."""
    _register(tiny_dataset, "popularity")
    _register(
        tiny_dataset, "ease", {"tune": _search(tiny_dataset, [1.0, 10.0, 100.0])}, ease_lambda=10.0
    )
    rng = np.random.default_rng(0)
    result = summarize(list(rng.lognormal(-5, 0.5, 500)), Counter({"200": 495, "429": 5}), 5.0, 8)
    load = tmp_path / "load.json"
    # what jobs.loadtest --out writes: the summary without the raw latencies
    load.write_text(json.dumps({k: v for k, v in result.items() if k != "latencies_ms"}))
    return tiny_dataset.lake, load


def test_the_report_holds_every_section(full_lake: tuple[Lake, Path], monkeypatch) -> None:
    lake, load = full_lake
    was_up = ray.is_initialized()  # another test's session cluster may be up already

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    page = build_report(lake, loadtest=load, baselines=True)
    assert "ScaleRec report: tiny-ease" in page  # the newest model when no name is given
    assert "class='missing'" not in page
    for text in (
        "tiny v-tiny",  # dataset version
        "<th>users</th><td>80</td>",
        "<th>items</th><td>48</td>",
        "tiny-popularity",  # a registered baseline on the same dataset version
        "ease (lambda 500) [baseline]",  # fitted here with baselines=True
        "test metrics, full ranking",
        "trial_00002",
        "model.ease_lambda",
        "p99_ms",
        "200: 495, 429: 5",
    ):
        assert text in page, text
    # dataset: popularity + activity; metrics: bars; Tune: trials; load test: percentiles
    assert page.count("<img src='data:image/png;base64,") == 5
    assert ray.is_initialized() == was_up  # the report, baselines included, needs no Ray


def test_missing_data_is_named_in_the_page(tiny_dataset: DatasetVersion) -> None:
    lake = tiny_dataset.lake
    model = build_model(ModelArgs(name="popularity"), tiny_dataset.n_users, tiny_dataset.n_items)
    cfg = AppConfig.model_validate(
        {"lake": lake.uri, "data": {"name": "tiny", "source": "synthetic"}}
    )
    register(lake, "tiny-popularity", model.fit(tiny_dataset.csr("train")), cfg, tiny_dataset, {})
    page = build_report(lake, "tiny-popularity", loadtest=None)
    for text in ("not evaluated on the test split", "no Tune search", "no load test given"):
        assert text in page, text
    assert page.count("<img ") == 2  # the dataset's plots still render
    assert "is not readable" in build_report(lake, loadtest=Path(lake.uri) / "nope.json")
    lake.remove("datasets/tiny")
    assert "dataset version is not readable" in build_report(lake)


def test_loadtest_section_plots_percentiles_per_status_and_the_histogram(tmp_path: Path) -> None:
    assert "no load test given" in loadtest_section(None)
    lat = [0.001, 0.002, 0.004, 0.2]
    # an open-loop run kept with its raw latencies (the Python API, not --out)
    result = summarize(lat, Counter({"200": 3, "503": 1}), 1.0, 4)
    result.update(target_rate=4.0, per_status={"200": summarize(lat[:3], Counter(), 1.0, 4)})
    path = tmp_path / "open.json"
    path.write_text(json.dumps(result))
    html = loadtest_section(path)
    assert "open loop" in html and html.count("<img ") == 2


def test_errors_say_what_to_run_first(tmp_path: Path, tiny_dataset: DatasetVersion, capsys) -> None:
    with pytest.raises(ReportError, match="does not exist: run python -m jobs.pipeline"):
        pick_model(Lake(str(tmp_path / "nowhere")))
    with pytest.raises(ReportError, match="no model is registered .* jobs.train"):
        pick_model(tiny_dataset.lake)
    _register(tiny_dataset, "popularity")
    with pytest.raises(ReportError, match=r"no model 'tiny-mf' .*registered: tiny-popularity"):
        pick_model(tiny_dataset.lake, "tiny-mf")
    assert report_job.main(["--lake", tiny_dataset.lake.uri, "--name", "tiny-mf"]) == 2
    assert "error: no model 'tiny-mf'" in capsys.readouterr().err
    assert report_job.main(["--lake", tiny_dataset.lake.uri, "--version", "nope"]) == 2
    assert "versions:" in capsys.readouterr().err


def _browser() -> str:
    found = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if found is None:
        if os.environ.get("SCALEREC_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"SCALEREC_REQUIRE_CHROMIUM=1 but none of {BROWSERS} is on PATH")
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on PATH")
    return found


def _body_tag(page: Path, tmp_path: Path) -> str:
    """The ``<body>`` tag of ``page`` after headless Chromium loaded it and ran its scripts."""
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",  # tests may run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",  # let the load event fire before the dump
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:500]
    return body.group()


def test_the_images_render_in_headless_chromium(
    full_lake: tuple[Lake, Path], tmp_path: Path
) -> None:
    lake, load = full_lake
    out = tmp_path / "report.html"
    assert report_job.main(["--lake", lake.uri, "--out", str(out), "--loadtest", str(load)]) == 0
    n = out.read_text().count("<img ")
    assert n == 5
    body = _body_tag(out, tmp_path)
    assert f'data-images="{n}/{n}"' in body and 'data-images-ok="true"' in body, body


def test_a_broken_image_fails_the_page_check(tmp_path: Path) -> None:
    from app.monitoring import page

    out = tmp_path / "broken.html"
    out.write_text(page.render("t", "s", [("x", page.img("data:image/png;base64,AAAA", "bad"))]))
    body = _body_tag(out, tmp_path)
    assert 'data-images="0/1"' in body and 'data-images-ok="false"' in body, body

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bench import cost_model as cm

REAL = Path(cm.__file__).parent / "results"
FILES = ("serve", "retrieval", "compress", "ingest", "train_throughput", "batch_predict", "events")
GIB = 2**30


def _synthetic(folder: Path) -> Path:
    """Results files with round numbers: exact search costs 0.1 ms + 1e-6 ms per item per user."""
    rows = [(b, 0.1 + 1e-6 * 200_000, 0.1 + 1e-6 * 1_000_000) for b in (1, 16, 64)]
    files = {
        "serve": {
            "workload": "100,000 items x 64 dims, 8 clients, Ray num_cpus=2, 2 cores",
            "results": {
                "default": {"qps": 1000.0, "p50_ms": 10.0, "p99_ms": 20.0},
                "serve_composed_haproxy": {"qps": 500.0},
            },
            "runs": {"default": [{"loadavg_1m_before": 1.0}]},
        },
        "retrieval": {
            "workload": "exact top-10 over 1,000,000 items x 64 dims (float32)",
            "threads": 2,
            "rows": [{"batch": b, "scalerec_ms": big * b} for b, _, big in rows],
            "ann": {
                "items": 200_000,
                "build_s": 10.0,
                "rows": [
                    {"batch": b, "exact_ms": small * b, "hnsw_ms": 0.5 * b, "recall_at_10": 0.9}
                    for b, small, _ in rows
                ],
            },
        },
        "compress": {
            "workload": {"synthetic_items": 1000},
            "latency_synthetic": {
                "single": {m: {"bytes": n} for m, n in (("none", 256_000), ("fp16", 128_000))}
                | {"int8": {"bytes": 66_000}}
            },
        },
        "ingest": {
            "cpus": 2,
            "sizes": [
                {"rows": 1000, "ray": {"rows_per_s": 100.0}},
                {"rows": 5000, "ray": {"rows_per_s": 2000.0}},
            ],
            "machine": {"loadavg_before": [1.0, 1.0, 1.0]},
        },
        "train_throughput": {
            "ray": {"cpus": 2},
            "workload": {
                "model": {"embed_dim": 128},
                "train": {"batch_size": 1000},
                "interactions_per_epoch": 700,
                "raw_events": 1000,
                "parameters": 1000,
            },
            "variants": [
                {"variant": "ray_2w", "epochs": [{"interactions_per_s": 4000.0}]},
            ],
            "probes": {"gloo_allreduce_2_ranks": {"ms_per_step": 10.0}},
            "machine": {},
        },
        "batch_predict": {
            "ray_data": {"users_per_s": 2000.0},
            "workload": {"cluster_cpus": 2.0, "items": 10_000, "chunk": 100},
        },
        "events": {
            "backends": {
                "embedded": {"events_per_s": 2000.0},
                "redis": {"events_per_s": 1000.0},
            },
            "load_avg_start": [0.5, 0.5, 0.5],
        },
    }
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


def _copy_real(folder: Path) -> Path:
    for name in FILES:
        shutil.copy(REAL / f"{name}.json", folder / f"{name}.json")
    return folder


@pytest.fixture(params=["real", "synthetic"])
def results(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return REAL if request.param == "real" else _synthetic(tmp_path)


def _calibrate(folder: Path) -> dict:
    return cm.calibrate(cm.Results(folder))


def test_synthetic_calibration_is_the_arithmetic_of_its_inputs(tmp_path: Path) -> None:
    c = _calibrate(_synthetic(tmp_path))
    assert c["serve_qps_per_core"] == 500.0
    for b in (1, 16, 64):
        assert c["exact"][b]["a_ms"] == pytest.approx(0.1)
        assert c["exact"][b]["b_ms_per_item"] == pytest.approx(1e-6)
        assert c["ann"][b]["ms"] == pytest.approx(0.5)
    # 2 core-ms per request, minus 2 threads x (0.1 + 0.1) ms of exact scan over 100k items
    assert c["fixed_core_ms"] == pytest.approx(1.6)
    assert c["hop_core_ms"] == pytest.approx(2.0)  # 2 cores / 500 QPS - 2 cores / 1000 QPS
    assert c["ingest_rows_per_core"] == 1000.0  # the largest size: 2000 rows/s on 2 CPUs
    assert c["train_per_core"] == 2000.0
    assert c["row_overhead"] == {"fp32": 0.0, "fp16": 0.0, "int8": 2.0}
    p = cm.Params(events=1_000_000, cores=10)
    d = cm.project(c, p)
    assert d["ingest_s"] == pytest.approx(100.0)  # 1M rows / (1000 rows/s/core x 10 cores)
    assert d["train_epoch_s_at_measured_rate"] == pytest.approx(35.0)  # 700k samples / 20k/s
    assert d["event_cores_embedded"] == pytest.approx(1e6 / 86400 / 1000 / p.headroom)


def test_doubling_qps_doubles_serving_cores(results: Path) -> None:
    c = _calibrate(results)
    for name in cm.SCENARIOS:
        one = cm.serving(c, cm.Params(qps=10_000), name)
        two = cm.serving(c, cm.Params(qps=20_000), name)
        assert two["cores"] == pytest.approx(2 * one["cores"])
        assert two["core_ms"] == pytest.approx(one["core_ms"])
        assert two["replicas"] >= one["replicas"]


def test_memory_scales_with_users_times_dim(results: Path) -> None:
    c = _calibrate(results)
    small = cm.project(c, cm.Params(users=1_000_000, items=1000))["memory_gib"]
    big = cm.project(c, cm.Params(users=2_000_000, items=1000))["memory_gib"]
    for key, m in small.items():
        assert big[key]["users"] == pytest.approx(2 * m["users"])
        assert big[key]["items"] == pytest.approx(m["items"])
    assert small["fp32 x 128"]["users"] == pytest.approx(2 * small["fp32 x 64"]["users"])
    assert small["fp32 x 64"]["users"] == pytest.approx(1_000_000 * 64 * 4 / GIB)


def test_int8_is_a_quarter_of_fp32_per_value_plus_a_row_scale(results: Path) -> None:
    c = _calibrate(results)
    for dim in (64, 128):
        fp32 = cm.row_bytes(c, "fp32", dim)
        assert fp32 == pytest.approx(4 * dim)
        assert cm.row_bytes(c, "int8", dim) - c["row_overhead"]["int8"] == pytest.approx(fp32 / 4)
        assert cm.row_bytes(c, "fp16", dim) == pytest.approx(fp32 / 2)
    assert c["row_overhead"]["int8"] == pytest.approx(2.0)  # the float16 scale of each row


@pytest.mark.parametrize("missing", FILES)
def test_a_missing_results_file_is_named(tmp_path: Path, missing: str) -> None:
    (_copy_real(tmp_path) / f"{missing}.json").unlink()
    with pytest.raises(cm.ResultsError, match=rf"{missing}\.json is missing.*bench\.{missing}"):
        cm.run(cm.Params(), tmp_path)


def test_a_missing_field_names_file_and_field(tmp_path: Path) -> None:
    folder = _synthetic(tmp_path)
    data = json.loads((folder / "serve.json").read_text())
    del data["results"]["default"]["qps"]
    (folder / "serve.json").write_text(json.dumps(data))
    with pytest.raises(cm.ResultsError, match=r"serve\.json has no field 'results\.default\.qps'"):
        cm.run(cm.Params(), folder)


def test_a_text_field_without_its_number_is_named(tmp_path: Path) -> None:
    folder = _synthetic(tmp_path)
    data = json.loads((folder / "serve.json").read_text())
    data["workload"] = "no sizes here"
    (folder / "serve.json").write_text(json.dumps(data))
    with pytest.raises(cm.ResultsError, match=r"serve\.json field 'workload~.*not a number"):
        cm.run(cm.Params(), folder)


def test_every_calibration_names_its_file_and_field() -> None:
    report = cm.run(cm.Params(), REAL)
    sources = report["calibration"]["sources"]
    qps = json.loads((REAL / "serve.json").read_text())["results"]["default"]["qps"]
    assert sources["serve_qps"] == {"value": qps, "from": "serve.json:results.default.qps"}
    assert {s["from"].split(":")[0] for s in sources.values()} == {f"{n}.json" for n in FILES}
    assert {"users", "headroom", "node_types", "head_usd_h", "latency"} <= report[
        "assumptions"
    ].keys()
    assert "recalled" in report["assumptions"]["head_usd_h"]
    assert report["machine_load"]["serve_runs_1m"]


def test_scenarios_meet_the_budget_they_claim(results: Path) -> None:
    c = _calibrate(results)
    p = cm.Params()
    for name in cm.SCENARIOS:
        s = cm.serving(c, p, name)
        assert s["meets_p99"] == (s["pass_ms"] <= p.p99_ms / c["tail"])
        assert s["replicas"] >= p.min_replicas * s["shards"]
        for n in s["nodes"].values():
            assert (n["nodes"] is None) == (n["usd_per_1m_recs"] is None)
    sharded = cm.serving(c, p, "exact, shards")
    assert sharded["meets_p99"] and sharded["shards"] >= 1


def test_a_replica_larger_than_every_node_type_does_not_fit() -> None:
    c = _calibrate(REAL)
    s = cm.serving(c, replace(cm.Params(), node_types=["tiny:8:1:0.1"]), "exact")
    assert s["nodes"]["tiny"] == {"nodes": None, "usd_h": None, "usd_per_1m_recs": None}


def test_flat_ann_scaling_keeps_the_measured_latency() -> None:
    c = _calibrate(REAL)
    flat = replace(cm.Params(), ann_scaling="flat")
    assert cm.retrieval_ms(c, flat, "ann", 16, 1e9) == pytest.approx(c["ann"][16]["ms"])
    assert cm.retrieval_ms(c, cm.Params(), "ann", 16, 1e9) > c["ann"][16]["ms"]


def test_cli_writes_the_json_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cost_model.json"
    cm.main(["--qps", "20000", "--node-types", "a:7:26:0.4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["inputs"]["qps"] == 20000.0 and report["inputs"]["node_types"] == ["a:7:26:0.4"]
    assert set(report["derived"]["serving"]["exact"]["nodes"]) == {"a"}
    printed = capsys.readouterr().out
    assert "| serving |" in printed and str(out) in printed

"""Cost model: per-core rates from ``bench/results/*.json``, projected to a target size and load.

python -m bench.cost_model [--users 100000000 --items 10000000 --qps 10000 --p99-ms 25 ...]
→ Markdown tables and bench/results/cost_model.json. Rates come from results files (``calibration``
names each file and field), all else is a parameter; no figure was measured at the target size.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 16, 64)  # users per scoring pass that bench.retrieval measured
GIB = 2**30
VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}  # bytes per value of each dtype (definitions)
NODE_TYPES = ("m6i.2xlarge:7:26:0.384", "r6i.2xlarge:7:52:0.504")
FIELDS = r"""file label:field[~regex of a number in the text] ... ({b}: per batch, {top}: largest)
serve serve_cores:workload~(\d+)\scores serve_items:workload~([\d,]+)\sitems
  dim:workload~x\s(\d+)\sdims serve_qps:results.default.qps p50_ms:results.default.p50_ms
  p99_ms:results.default.p99_ms composed_qps:results.serve_composed_haproxy.qps
retrieval big_items:workload~([\d,]+)\sitems threads:threads ann_items:ann.items
  ann_build_s:ann.build_s exact_ms_b{b}:rows.batch={b}.scalerec_ms
  exact_small_ms_b{b}:ann.rows.batch={b}.exact_ms hnsw_ms_b{b}:ann.rows.batch={b}.hnsw_ms
  recall_b{b}:ann.rows.batch={b}.recall_at_10
compress compress_items:workload.synthetic_items fp32_bytes:latency_synthetic.single.none.bytes
  fp16_bytes:latency_synthetic.single.fp16.bytes int8_bytes:latency_synthetic.single.int8.bytes
ingest ingest_cpus:cpus ingest_rows_s:sizes.rows={top}.ray.rows_per_s
train_throughput train_rate:variants.variant=ray_2w.epochs.0.interactions_per_s train_cpus:ray.cpus
  train_dim:workload.model.embed_dim train_batch:workload.train.batch_size
  epoch_rows:workload.interactions_per_epoch raw_events:workload.raw_events
  sync_ms:probes.gloo_allreduce_2_ranks.ms_per_step
batch_predict bp_users_s:ray_data.users_per_s bp_cpus:workload.cluster_cpus bp_items:workload.items
  bp_chunk:workload.chunk
events events_embedded_s:backends.embedded.events_per_s events_redis_s:backends.redis.events_per_s
"""
ASSUMED = {  # assumptions that are no parameter; the parameters' sources are their comments
    "latency": "a request takes one scoring pass; p99 = pass x the serve run's p99/p50",
    "core = vCPU": "a core of the 2-core machine counts as one vCPU of a node type",
    "node_types": "Ray CPUs, GiB: cluster.yaml's m6i.2xlarge reserve; USD/h: on-demand, recalled",
}


class ResultsError(ValueError):
    """A results file or one of its fields is missing; the message names both."""


class Results:
    """The results files, each read once; every figure used is recorded with its source."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data: dict[str, Any] = {}
        self.sources: dict[str, dict[str, Any]] = {}

    def get(self, name: str, path: str) -> Any:
        """Field ``path`` of ``<name>.json``: dotted keys, list indices, ``key=value`` picks."""
        if name not in self.data:
            file = self.folder / f"{name}.json"
            if not file.is_file():
                raise ResultsError(f"{file} is missing: run python -m bench.{name} to write it")
            self.data[name] = json.loads(file.read_text())
        value = self.data[name]
        for key in path.split("."):
            k, _, want = key.partition("=")
            try:  # a list takes an index or a key=value pick, a dict a key
                pick = (x for x in value if str(x[k]) == want) if want else None
                value = next(pick) if pick else value[int(key) if isinstance(value, list) else key]
            except (KeyError, IndexError, ValueError, TypeError, StopIteration):
                raise ResultsError(f"{name}.json has no field {path!r} (at {key!r})") from None
        return value

    def num(self, label: str, name: str, spec: str) -> float:
        """The number at ``field[~regex]`` (the regex's group in a text field), as ``label``."""
        path, _, pattern = spec.partition("~")
        value = self.get(name, path)
        if pattern and (found := re.search(pattern, str(value))):
            value = float(found.group(1).replace(",", ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ResultsError(f"{name}.json field {spec!r} is {value!r}, not a number")
        self.sources[label] = {"value": value, "from": f"{name}.json:{spec}"}
        return float(value)


@dataclass
class Params:
    """The projection's target and assumptions; each default's source is its comment."""

    users: int = 100_000_000  # target (input)
    items: int = 10_000_000  # target (input)
    qps: float = 10_000.0  # target (input)
    p99_ms: float = 25.0  # serving target of docs/performance.md, not a measurement
    events: int = 500_000_000  # target (input)
    event_days: float = 1.0  # assumption: the events arrive over this many days
    cores: int = 56  # cluster.yaml: cpu-worker max_workers 8 x 7 Ray CPUs
    headroom: float = 0.7  # assumption: share of the measured CPU capacity used (bursts, loss)
    min_replicas: int = 2  # serve_configs/production.yaml (per item shard when sharded)
    node_mem_gib: float = 64.0  # assumption: the node memory of the fits-one-node check
    mem_frac: float = 0.8  # assumption: the share of it the tables may use
    hnsw_m: int = 32  # app/serve/ann.py; assumption: faiss keeps 2*m int32 links per item
    ann_scaling: str = "log"  # assumption: HNSW cost ~ ln(items), or flat; build ~ n ln n
    events_cores: float = 2.0  # docs/performance.md: bench.events' cluster (not in its file)
    adam_states: int = 2  # assumption: torch Adam keeps 2 fp32 moments per parameter
    head_usd_h: float = 0.192  # assumption: m6i.xlarge head (0 task CPUs), on-demand, recalled
    node_types: list[str] = field(default_factory=lambda: list(NODE_TYPES))  # see ASSUMED


def calibrate(r: Results) -> dict[str, Any]:
    """Per-core rates, fits and sizes from the results files (their sources: ``r.sources``)."""
    top = max(int(s["rows"]) for s in r.get("ingest", "sizes"))
    name, v = "", {}
    for line in FIELDS.splitlines()[1:]:  # a line that starts with a space continues its file
        words = line.split()
        name, items = (name, words) if line.startswith(" ") else (words[0], words[1:])
        for label, spec in (item.split(":", 1) for item in items):
            for b in BATCHES if "{b}" in label else (0,):
                v[label.format(b=b)] = r.num(label.format(b=b), name, spec.format(b=b, top=top))
    c: dict[str, Any] = dict(v)
    c["serve_qps_per_core"] = v["serve_qps"] / v["serve_cores"]
    c["serve_core_ms"] = 1000.0 / c["serve_qps_per_core"]
    c["tail"] = v["p99_ms"] / v["p50_ms"]
    c["hop_core_ms"] = max(0.0, v["serve_cores"] * 1000.0 / v["composed_qps"] - c["serve_core_ms"])
    c["exact"], c["ann"], big, small = {}, {}, v["big_items"], v["ann_items"]
    for b in BATCHES:  # exact: the line through both sizes, in ms per user at that batch
        slope = (v[f"exact_ms_b{b}"] - v[f"exact_small_ms_b{b}"]) / b / (big - small)
        a_ms = max(0.0, v[f"exact_small_ms_b{b}"] / b - slope * small)
        c["exact"][b] = {"a_ms": a_ms, "b_ms_per_item": slope}
        c["ann"][b] = {"ms": v[f"hnsw_ms_b{b}"] / b, "items": small, "recall": v[f"recall_b{b}"]}
    # A served request's fixed part (HTTP, event loop, ids): its cost minus its exact scan, by
    # the batch-16 fit (the serve run's waves of 8 requests are nearest batch 16).
    scan = v["threads"] * retrieval_ms(c, Params(), "exact", 16, v["serve_items"])
    c["fixed_core_ms"] = max(0.0, c["serve_core_ms"] - scan)
    rows = {m: v[f"{m}_bytes"] / v["compress_items"] for m in VALUE_BYTES}
    c["row_overhead"] = {m: rows[m] - VALUE_BYTES[m] * rows["fp32"] / 4 for m in rows}
    c["ingest_rows_per_core"] = v["ingest_rows_s"] / v["ingest_cpus"]
    c["train_per_core"] = v["train_rate"] / v["train_cpus"]
    c["interactions_per_event"] = v["epoch_rows"] / v["raw_events"]
    c["sync_ms_per_peer"] = v["sync_ms"]  # one step's touched rows from one other worker
    c["bp_users_per_core"] = v["bp_users_s"] / v["bp_cpus"]
    return c


def row_bytes(c: dict[str, Any], mode: str, dim: float) -> float:
    """Bytes of one embedding row: its values plus the per-row overhead (int8: its scale)."""
    return VALUE_BYTES[mode] * dim + c["row_overhead"][mode]


def retrieval_ms(c: dict[str, Any], p: Params, kind: str, batch: int, items: float) -> float:
    """Wall ms per user of a scoring pass (on ``threads`` threads) over ``items`` items."""
    a, e = c["ann"][batch], c["exact"][batch]
    grow = math.log(items) / math.log(a["items"]) if p.ann_scaling == "log" else 1.0
    return float(a["ms"] * grow if kind == "ann" else e["a_ms"] + e["b_ms_per_item"] * items)


# name: (retrieval, user table in every replica, in the code today)
SCENARIOS = {"exact": ("exact", True, True), "ann": ("ann", True, True)}
SCENARIOS |= {"ann, users in KV": ("ann", False, False), "exact, shards": ("sharded", False, False)}


def serving(c: dict[str, Any], p: Params, name: str) -> dict[str, Any]:
    """A scenario at its cheapest measured batch that meets the p99 budget (else the cheapest)."""
    kind, users_in, in_code = SCENARIOS[name]
    budget = p.p99_ms / c["tail"]  # wall ms that one scoring pass may take
    best: dict[str, Any] = {}
    for b in BATCHES:
        shards, e = 1, c["exact"][b]
        if kind == "sharded":  # the fewest item ranges whose pass fits the budget
            if budget / b <= e["a_ms"]:
                continue
            shards = math.ceil(p.items * e["b_ms_per_item"] / (budget / b - e["a_ms"]))
        per_user = retrieval_ms(c, p, "ann" if kind == "ann" else "exact", b, p.items / shards)
        core_ms = c["fixed_core_ms"] + c["threads"] * per_user * shards
        core_ms += c["hop_core_ms"] * shards if kind == "sharded" else 0.0
        row = {"batch": b, "shards": shards, "pass_ms": b * per_user, "core_ms": core_ms}
        row["meets_p99"] = row["pass_ms"] <= budget
        if not best or (row["meets_p99"], -core_ms) > (best["meets_p99"], -best["core_ms"]):
            best = row
    rb, hnsw = row_bytes(c, "fp32", c["dim"]), (c["dim"] + 1) * 4 + 2 * p.hnsw_m * 4
    # the items (a shard of them); HNSW: faiss's own copy (dim + 1 floats) and level-0 links
    mem = p.items * (rb / best["shards"] + hnsw * (kind == "ann")) + p.users * rb * users_in
    cores = p.qps * best["core_ms"] / 1000.0 / p.headroom
    per_shard = max(p.min_replicas, math.ceil(cores / c["serve_cores"] / best["shards"]))
    out = best | {"in_code": in_code, "cores": cores, "replicas": per_shard * best["shards"]}
    out |= {"gib_per_replica": mem / GIB, "nodes": {}}
    for spec in p.node_types:  # NAME:RAY_CPUS:RAY_MEM_GIB:USD_H
        nt, cpus, mem_gib, usd = spec.split(":")
        fit = min(int(cpus) // int(c["serve_cores"]), int(float(mem_gib) * GIB // mem))
        nodes = math.ceil(out["replicas"] / fit) if fit else None
        usd_h = nodes * float(usd) + p.head_usd_h if nodes else None
        per_m = usd_h / (p.qps * 3600 / 1e6) if usd_h else None
        out["nodes"][nt] = {"nodes": nodes, "usd_h": usd_h, "usd_per_1m_recs": per_m}
    return out


def project(c: dict[str, Any], p: Params) -> dict[str, Any]:
    """Memory, serving, ingest, training, batch prediction and event intake at the target."""
    d: dict[str, Any] = {"memory_gib": {}, "serving": {n: serving(c, p, n) for n in SCENARIOS}}
    for dim in sorted({c["dim"], c["train_dim"]}):
        for mode in VALUE_BYTES:
            u, i = (n * row_bytes(c, mode, dim) for n in (p.users, p.items))
            shards = math.ceil((u + i) / (p.node_mem_gib * p.mem_frac * GIB))
            d["memory_gib"][f"{mode} x {dim:g}"] = dict(users=u / GIB, items=i / GIB, nodes=shards)
    n0 = c["ann"][1]["items"]
    d["ann_build_s"] = c["ann_build_s"] * p.items * math.log(p.items) / (n0 * math.log(n0))
    d["ingest_s"] = p.events / (c["ingest_rows_per_core"] * p.cores)
    rows = d["train_epoch_samples"] = p.events * c["interactions_per_event"]
    params = (p.users + p.items) * c["train_dim"]
    d["train_epoch_s_at_measured_rate"] = rows / (c["train_per_core"] * p.cores)
    # Each step all-gathers every other worker's touched rows (their size follows the batch).
    steps = rows / (c["train_batch"] * p.cores)
    d["train_epoch_s_row_sync"] = steps * c["sync_ms_per_peer"] * (p.cores - 1) / 1000.0
    d["train_worker_gib_whole_tables"] = params * 4 * (1 + p.adam_states) / GIB
    # the run's per-user cost minus its exact scan, plus the target's scan (batch 64: the largest)
    scan = c["threads"] * retrieval_ms(c, p, "exact", 64, c["bp_items"])
    base = 1000.0 / c["bp_users_per_core"] - scan
    for kind in ("exact", "ann"):
        ms = base + c["threads"] * retrieval_ms(c, p, kind, 64, p.items)
        d[f"batch_predict_s_{kind}"] = p.users * ms / 1000.0 / p.cores
    # One chunk's scores at a time: a chunk of the measured rows over the target's items.
    d["batch_predict_scores_gib_per_chunk"] = c["bp_chunk"] * p.items * 4 / GIB
    rate = d["event_rate"] = p.events / (p.event_days * 86400)
    for b in ("embedded", "redis"):
        d[f"event_cores_{b}"] = rate / (c[f"events_{b}_s"] / p.events_cores) / p.headroom
    return d


def _md(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        if isinstance(x, bool) or x is None:
            return {True: "yes", False: "no", None: "does not fit"}[x]
        if isinstance(x, float):
            return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return f"{x:,}" if isinstance(x, int) else str(x)

    lines = [head, ["---"] * len(head), *([cell(x) for x in r] for r in rows)]
    return ["| " + " | ".join(r) + " |" for r in lines] + [""]


def render(c: dict[str, Any], p: Params, d: dict[str, Any]) -> str:
    """The readable tables (Markdown); figures keep their JSON names."""
    out = [f"{p.users:,} users x {p.items:,} items, {p.qps:,.0f} QPS, p99 <= {p.p99_ms:g} ms", ""]
    shown = "serve_qps_per_core fixed_core_ms hop_core_ms tail ingest_rows_per_core train_per_core"
    cal = [[k, c[k]] for k in (*shown.split(), "bp_users_per_core", "interactions_per_event")]
    out += _md(["calibration (2-core machine)", "value"], cal)
    fit = [[b, *c["exact"][b].values(), c["ann"][b]["ms"], c["ann"][b]["recall"]] for b in BATCHES]
    out += _md(["batch", "exact ms/user", "+ ms/user per item", "HNSW ms/user", "recall@10"], fit)
    mem = [[k, *m.values()] for k, m in d["memory_gib"].items()]
    out += _md(["table", "users GiB", "items GiB", f"{p.node_mem_gib:g} GiB nodes"], mem)
    cols = "in_code batch shards pass_ms meets_p99 core_ms cores replicas gib_per_replica".split()
    types = [t.split(":")[0] for t in p.node_types]
    head = ["serving", *cols, *(f"{t} {x}" for t in types for x in ("nodes", "$/1M recs"))]
    rows = [[n, *(s[k] for k in cols)] for n, s in d["serving"].items()]
    for row, s in zip(rows, d["serving"].values(), strict=True):
        row += [x for n in s["nodes"].values() for x in (n["nodes"], n["usd_per_1m_recs"])]
    out += _md(head, rows)
    scalars = [[k, f"{x / 3600:,.2f} h" if "s" in k.split("_") else x] for k, x in d.items()]
    out += _md(["projection (seconds shown as hours)", "value"], scalars[2:])
    return "\n".join(out).rstrip()


def run(p: Params, results: Path = RESULTS) -> dict[str, Any]:
    """Calibrate from ``results`` and project: everything ``cost_model.json`` holds."""
    c = calibrate(r := Results(results))
    d = project(c, p)
    load = {n: r.data[n].get("machine") for n in ("ingest", "train_throughput")}
    load["events"] = {k: x for k, x in r.data["events"].items() if k.startswith("load")}
    load["serve_runs_1m"] = [x.get("loadavg_1m_before") for x in r.get("serve", "runs.default")]
    found = re.findall(r"^    (\w+): .+  # (.+)$", inspect.getsource(Params), re.MULTILINE)
    out: dict[str, Any] = {"command": "python -m bench.cost_model", "inputs": asdict(p)}
    out |= {"assumptions": dict(found) | ASSUMED, "machine_load": load, "derived": d}
    return out | {"calibration": {"sources": r.sources, "derived": c}, "table": render(c, p, d)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, value in asdict(Params()).items():
        kind, nargs = (str, "+") if isinstance(value, list) else (type(value), None)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value, nargs=nargs)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=RESULTS / "cost_model.json")
    ns = vars(ap.parse_args(argv))
    results, out = ns.pop("results"), ns.pop("out")
    report = run(Params(**ns), results)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['table']}\n\nwritten: {out}")
    return report


if __name__ == "__main__":
    main()

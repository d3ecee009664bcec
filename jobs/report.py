"""Write the HTML report of a registered model: dataset, metrics vs baselines, Tune, load test.

python -m jobs.report --lake ./lake [--name synthetic-mf] [--version production] \
    [--out report.html] [--loadtest load.json] [--baselines]

One self-contained file (images inline). No Ray needed; the logic is in ``app.monitoring.report``.
"""

from __future__ import annotations

import argparse
import sys

from app.cli import setup_logging
from app.monitoring import report
from app.store import Lake, LakeError


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns the exit status (2 when the lake or the model is missing)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lake", required=True, help="lake folder or s3:// URI")
    p.add_argument("--name", help="registry name, e.g. synthetic-mf (default: newest model)")
    p.add_argument("--version", default="latest", help="version id, prefix or alias")
    p.add_argument("--out", default="report.html")
    p.add_argument("--loadtest", help="JSON written by python -m jobs.loadtest --out")
    p.add_argument("--baselines", action="store_true", help="fit Popularity and EASE here")
    ns = p.parse_args(argv)
    setup_logging()
    try:
        path = report.run(Lake(ns.lake), ns.out, ns.name, ns.version, ns.loadtest, ns.baselines)
    except LakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

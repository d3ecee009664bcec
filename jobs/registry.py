"""List a model's versions with their users, or delete a version nothing uses.

python -m jobs.registry list --lake ./lake --name synthetic-mf
python -m jobs.registry delete --lake ./lake --name synthetic-mf --version <id> [--force]

A version in use (an alias, a serving pointer, a live app) is refused with exit status 1 and
the reason; an unknown version exits with status 2. The logic lives in ``app.store.usage``.
"""

from __future__ import annotations

import argparse
import sys

from app.cli import setup_logging
from app.store import Lake, RegistryError, VersionInUse, delete_version, usage_table


def main(argv: list[str] | None = None) -> int:
    """Run ``list`` or ``delete``; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["list", "delete"])
    parser.add_argument("--lake", required=True, help="lake folder or s3:// URI")
    parser.add_argument("--name", required=True, help="registry name, e.g. synthetic-mf")
    parser.add_argument("--version", help="exact version id to delete")
    parser.add_argument("--force", action="store_true", help="delete even when in use")
    ns = parser.parse_args(argv)
    setup_logging()
    lake = Lake(ns.lake)
    try:
        if ns.command == "list":
            print(usage_table(lake, ns.name))
        elif not ns.version:
            parser.error("delete needs --version")
        else:
            entry = delete_version(lake, ns.name, ns.version, force=ns.force)
            print(f"deleted {ns.name} {ns.version}" + (" (forced)" if entry["forced"] else ""))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, VersionInUse) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

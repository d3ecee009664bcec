"""Create or list the API keys of the serving stage (only their SHA-256 is stored).

python -m jobs.keys add --file keys.yaml --client shop-backend --scope events:write
    [--scope recommend:read ...] [--rate 50] [--burst 100]
python -m jobs.keys list --file keys.yaml

``add`` prints the new key once, alone on stdout: hand it to the client, it cannot be recovered.
A bad file or entry exits with status 2. The logic lives in ``app.serve.auth``; see
docs/api-keys.md.
"""

from __future__ import annotations

import argparse
import sys

from app.serve.auth import SCOPES, KeyFileError, add_key, read_key_file


def main(argv: list[str] | None = None) -> int:
    """Run ``add`` or ``list``; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["add", "list"])
    parser.add_argument("--file", required=True, help="key file, .json or .yaml")
    parser.add_argument("--client", help="client name, e.g. shop-backend (add)")
    parser.add_argument("--scope", action="append", choices=SCOPES, default=[], help="repeatable")
    parser.add_argument("--rate", type=float, help="requests/s for this key (default: auth args)")
    parser.add_argument("--burst", type=int, help="burst for this key (default: auth args)")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "list":
            table = [("client", "scopes", "rate/s", "burst", "sha256")] + [
                (
                    k.client,
                    ",".join(sorted(k.scopes)),
                    str(k.rate_per_s or "-"),
                    str(k.burst or "-"),
                    k.sha256[:12] + "...",
                )
                for k in read_key_file(ns.file)
            ]
            widths = [max(map(len, column)) for column in zip(*table, strict=True)]
            for row in table:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        elif not ns.client or not ns.scope:
            parser.error("add needs --client and at least one --scope")
        else:
            key = add_key(ns.file, ns.client, ns.scope, ns.rate, ns.burst)
            # the key alone on stdout, so that KEY=$(python -m jobs.keys add ...) captures it
            print(key)
            print(
                f"new key of {ns.client!r}, shown once: store it in the client's secrets; "
                f"its SHA-256 was appended to {ns.file}",
                file=sys.stderr,
            )
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line every ScaleRec job shares: ``--config PATH [dotted.key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from app.config import AppConfig, ConfigError, config_to_yaml, load_config

T = TypeVar("T")


def job_parser(description: str, config_example: str) -> argparse.ArgumentParser:
    """The command line every job shares: ``--config PATH [dotted.key=value ...]``."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, e.g. train.num_workers=2 lake=s3://bucket/lake",
    )
    parser.add_argument("--config", required=True, help=f"YAML file, e.g. {config_example}")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser


def setup_logging() -> None:
    """Job logging: timestamps and logger names on stderr."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def exit_on_config_error(load: Callable[[], T]) -> T:
    """Run a config loader; a ``ConfigError`` prints its message and exits with status 2."""
    try:
        return load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def config_from_cli(description: str, argv: list[str] | None = None) -> AppConfig:
    """Parse ``--config PATH [dotted.key=value ...]`` for a job; exits with a message on errors."""
    args = job_parser(description, "jobs/configs/synthetic.yaml").parse_args(argv)
    setup_logging()
    cfg = exit_on_config_error(lambda: load_config(args.config, args.overrides))
    logging.getLogger("scalerec").info("resolved config:\n%s", config_to_yaml(cfg))
    return cfg

"""`relay`'s distributed subcommands, added to the trainer's CLI (relay_train.cli)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from relay_train import cli as base

log = logging.getLogger("relay")


def cmd_launch(args: argparse.Namespace) -> int:
    """Start a local Ray cluster (or join RAY_ADDRESS's) and run the job on it."""
    import ray

    from orchestrator.cluster import load_cluster_config
    from orchestrator.launch import launch

    cluster = load_cluster_config(args.cluster, base.parse_overrides(args.cluster_set))
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        result = launch(args.config, base.parse_overrides(args.set), cluster)
    finally:
        ray.shutdown()
    if result.error:
        log.error("run failed: %s", result.error)
        return 1
    log.info("run complete; latest checkpoint: %s", result.checkpoint.path if result.checkpoint else None)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="run the job data-parallel on Ray (a local cluster unless RAY_ADDRESS)")
    launch.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    launch.add_argument("--cluster", type=Path, help="cluster.json: workers, storage_path, failure limits")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    launch.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cluster key")
    launch.set_defaults(func=cmd_launch)


def main(argv: list[str] | None = None) -> int:
    return base.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())

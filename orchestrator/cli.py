"""`relay`'s distributed subcommands, added to the trainer's CLI (relay_train.cli)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from relay_train import cli as base

log = logging.getLogger("relay")
DEMO = Path("configs/demo")


def cmd_launch(args: argparse.Namespace) -> int:
    """Start a local Ray cluster (or join RAY_ADDRESS's) and run the job on it."""
    import ray

    from orchestrator.cluster import load_cluster_config
    from orchestrator.launch import launch

    from orchestrator.launch import StorageError

    cluster = load_cluster_config(args.cluster, base.parse_overrides(args.cluster_set))
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        result = launch(args.config, base.parse_overrides(args.set), cluster)
    except StorageError as exc:
        log.error("%s", exc)
        return 2
    finally:
        ray.shutdown()
    if result.error:
        log.error("run failed: %s", result.error)
        return 1
    log.info("run complete; latest checkpoint: %s", result.checkpoint.path if result.checkpoint else None)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's demo: tiny model + images where missing, then `launch` on configs/demo (local Ray, 2 workers)."""
    from relay_train.demo_data import make_demo_dataset
    from relay_train.tiny_model import make_pipeline

    if not Path("demo/tiny-sd3/model_index.json").is_file():
        make_pipeline("demo/tiny-sd3")
    if not any(Path("demo/data").glob("*.txt")):
        make_demo_dataset("demo/data")
    args.config, args.cluster = DEMO / "config.json", DEMO / "cluster.json"
    return cmd_launch(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="run the job data-parallel on Ray (a local cluster unless RAY_ADDRESS)")
    launch.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    launch.add_argument("--cluster", type=Path, help="cluster.json: workers, storage_path, failure limits")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    launch.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cluster key")
    launch.set_defaults(func=cmd_launch)

    demo = sub.add_parser("demo", help="tiny model + demo images, then launch configs/demo on a local Ray cluster")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    demo.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE", help="override a cluster key")
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    return base.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())

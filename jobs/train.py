"""Entry point for `ray job submit`:

    ray job submit --working-dir . -- python jobs/train.py --config configs/sd3/config.json \
        --cluster configs/sd3/cluster.json

Joins the cluster the job was submitted to, then runs (or resumes, by run name) the training job.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir: relay_train, orchestrator

from orchestrator.cluster import load_cluster_config  # noqa: E402
from orchestrator.launch import StorageError, launch  # noqa: E402
from relay_train.cli import parse_overrides  # noqa: E402
from relay_train.config import ConfigError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cluster", help="cluster.json (workers, storage_path, failure limits)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    ray.init()  # inside a submitted job this joins its cluster
    try:
        result = launch(args.config, parse_overrides(args.set),
                        load_cluster_config(args.cluster, parse_overrides(args.cluster_set)))
    except ConfigError as exc:
        logging.error("invalid config:\n%s", exc)
        return 2
    except StorageError as exc:
        logging.error("%s", exc)
        return 2
    return 1 if result.error else 0


if __name__ == "__main__":
    sys.exit(main())

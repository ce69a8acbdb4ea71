"""Entry point for `ray job submit`:

    ray job submit --working-dir . -- python jobs/train.py --config configs/sd3/config.json \
        --cluster configs/sd3/cluster.json

Joins the cluster the job was submitted to, then runs (or resumes, by run name) the training job.
Exit codes: 0 completed, 1 failed (a resubmission may help), 2 configuration or storage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir: relay_train, orchestrator

from orchestrator.launch import run_job  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cluster", help="cluster.json (workers, storage_path, failure limits)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_job(args.config, args.cluster, args.set, args.cluster_set)


if __name__ == "__main__":
    sys.exit(main())

"""Entry point for `ray job submit`:

    ray job submit --working-dir . -- python jobs/train.py --config configs/sd3/config.json \
        --cluster configs/sd3/cluster.json

Joins the cluster the job was submitted to, then runs (or resumes, by run name) the training job.
Exit codes: relay_train/exit_codes.py (COMMANDS["jobs/train.py"]), the same as `relay launch`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir: relay_train, orchestrator

from orchestrator.run.launch import run_job
from relay_train.cli import configure_logging
from relay_train.config import ConfigError
from relay_train.config.overrides import add_set_flag, flag_pairs
from relay_train.exit_codes import Exit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cluster", help="cluster.json (workers, storage_path, failure limits)")
    add_set_flag(parser)
    parser.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's and the workers' own logs too")
    args, flags = parser.parse_known_args()  # config keys as SimpleTuner-style flags: --key=value, --key value
    configure_logging(args.verbose)
    try:
        sets = [*args.set, *flag_pairs(flags)]
    except ConfigError as exc:
        logging.getLogger("relay").error("invalid config:\n%s", exc)
        return Exit.CONFIG
    return run_job(args.config, args.cluster, sets, args.cluster_set, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

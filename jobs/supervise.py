"""Job-level autoresume: submit jobs/train.py to a Ray cluster and resubmit it when it fails or the
head is replaced (see orchestrator/supervise.py for the exit codes).

    python jobs/supervise.py --address http://HEAD:8265 --config configs/sd3/config.json \
        --cluster configs/sd3/cluster.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir: relay_train, orchestrator

from orchestrator.ops import supervise  # noqa: E402
from relay_train.logs import configure_logging


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    supervise.add_arguments(parser)
    args = parser.parse_args()
    configure_logging()
    return supervise.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`relay`'s distributed subcommands, added to the trainer's CLI (relay_train.cli)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from relay_train import cli as base
from relay_train.config.overrides import add_set_flag, flag_pairs, parse_overrides
from relay_train.exit_codes import Exit

log = logging.getLogger("relay")
DEMO = Path("configs/demo")


def cmd_launch(args: argparse.Namespace) -> int:
    """Start a local Ray cluster (or join RAY_ADDRESS's) and run the job on it; exit codes as run_job's."""
    from orchestrator.run.launch import run_job

    return run_job(args.config, args.cluster, config_sets(args), args.cluster_set, verbose=args.verbose)


def config_sets(args: argparse.Namespace) -> list[str]:
    """The config overrides as key=value: --set's, then config keys given as flags (--key=value)."""
    return [*args.set, *flag_pairs(args.config_flags)]


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's demo: tiny model + images where missing, then `launch` on configs/demo (local Ray,
    2 workers, validation on); launch shares this machine's CPUs among them (resources.fit_cpus)."""
    if not Path("demo/tiny-sd3/model_index.json").is_file():
        from relay_train.demo.tiny_model import make_pipeline  # diffusers and transformers: only to write it

        make_pipeline("demo/tiny-sd3")
    if not any(Path("demo/data").glob("*.txt")):
        from relay_train.demo.data import make_demo_dataset

        make_demo_dataset("demo/data")
    args.config, args.cluster = DEMO / "config.json", DEMO / "cluster.json"
    code = cmd_launch(args)
    if code == Exit.OK:
        print(demo_outputs(args), file=sys.stderr)
    return code


def demo_outputs(args: argparse.Namespace) -> str:
    """Where the demo's outputs are, for the config and cluster it ran with (`--set`, `--cluster-set` included)."""
    from relay_train.artifacts import CHECKPOINT_PREFIX, VALIDATION_DIR, adapter_names, run_name
    from relay_train.config import load_config

    from orchestrator.core.cluster import load_cluster_config
    from orchestrator.core.ledger import LEDGER

    config = load_config(args.config, parse_overrides(config_sets(args)))
    cluster = load_cluster_config(args.cluster, parse_overrides(args.cluster_set))
    name = cluster.run_name or run_name(config)
    run = f"{cluster.storage_path.rstrip('/')}/{name}"
    limit = f" (newest {config.checkpoints_total_limit})" if config.checkpoints_total_limit else ""
    return "\n".join(
        [
            "",
            "where the demo's outputs are:",
            f"  adapter       {Path(config.output_dir) / adapter_names(run_name(config))[0]} (and -ema)",
            f"  checkpoints   {run}/{CHECKPOINT_PREFIX}*/{limit}",
            f"  validation    {run}/{VALIDATION_DIR}/{CHECKPOINT_PREFIX}*/grid.png",
            f"  ledger        {run}/{LEDGER}",
            f"  status        relay status {name} --storage {cluster.storage_path}",
        ]
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """Render and score the validation prompts for one checkpoint folder or adapter file, in this process."""
    from relay_train.config import load_config
    from relay_train.validate.render import validate_offline

    config = load_config(args.config, parse_overrides(args.set))
    result, out = validate_offline(config, args.checkpoint, args.out)
    scores = "".join(f"; {v} CLIP mean {s['mean']:.2f}" for v, s in result.scores().items())
    log.info("validated step %d: %d image(s) in %s%s", result.step, len(result.images), out, scores)
    return Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    """OK: shown; NO_SUCH_RUN: no such run there; CONFIG: the storage cannot be read (bucket, credentials, endpoint),
    or RUN is not a plain run name."""
    from relay_train.config.names import path_part_problem

    from orchestrator.ops.status import RunNotFound, status

    if problem := path_part_problem(args.run):  # a name, never a path: status reads only inside --storage
        log.error("run name %r %s", args.run, problem)
        return Exit.CONFIG
    try:
        shown = status(args.run, args.storage, args.endpoint, as_json=args.json, hub=not args.no_hub)
    except RunNotFound as exc:
        log.error("%s", exc)
        return Exit.NO_SUCH_RUN
    except OSError as exc:
        log.error("cannot read %s: %s", args.storage, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return Exit.CONFIG
    try:
        print(shown, flush=True)
    except BrokenPipeError:  # the reader went away (`relay status ... | head`): not a storage error, not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail again
        return Exit.SIGPIPE
    return Exit.OK


def cmd_spot_agent(args: argparse.Namespace) -> int:
    from ray._private.services import canonicalize_bootstrap_address_or_die

    from orchestrator.ops import spot

    sigterm = spot.watch_sigterm()  # first: an eviction during start-up still drains
    try:
        gcs = canonicalize_bootstrap_address_or_die(args.ray_address)
        node_id = args.node_id or spot.local_node_id(gcs)
        if args.drain_now:  # a preStop hook: the pod is going now, with --sigterm-grace seconds left
            notice = spot.Notice.sigterm(args.sigterm_grace)
            spot.drain_node(gcs, node_id, notice)
            released = spot.hold_until_released(gcs, node_id, notice.deadline - 5)
            log.warning("spot agent: node %s drained; %s", node_id[:12], "its workers left" if released else "deadline reached")
            return Exit.OK
        source = spot.detect_cloud(args.aws_endpoint, args.gcp_endpoint, args.cloud, rebalance=args.rebalance == "drain")
        if source is None:
            log.warning(
                "spot agent: no cloud metadata service answered (AWS %s, GCP %s); draining on SIGTERM only",
                args.aws_endpoint,
                args.gcp_endpoint,
            )
        notice = spot.run_agent(source, gcs, node_id, interval=args.interval, sigterm=sigterm, sigterm_grace=args.sigterm_grace)
    except (RuntimeError, ConnectionError, ValueError) as exc:  # one line for the operator, not a traceback
        log.error("spot agent: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return Exit.FAILED
    return Exit.OK if notice else Exit.FAILED


def cmd_supervise(args: argparse.Namespace) -> int:
    from orchestrator.ops import supervise

    return supervise.run(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="where a run stands: step, rate, ETA, checkpoints, preemptions, goodput")
    status.add_argument("run", help="the run name")
    status.add_argument("--storage", required=True, help="the cluster config's storage_path (s3://... or a folder)")
    status.add_argument("--endpoint", help="S3-compatible endpoint URL")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--no-hub", action="store_true", help="do not ask the Hub for its checkpoints")
    status.set_defaults(func=cmd_status, light=True)

    agent = sub.add_parser("spot-agent", help="watch this node's spot notice and drain it from Ray on one")
    agent.add_argument("--interval", type=float, default=5.0, help="seconds between metadata polls")
    agent.add_argument("--cloud", choices=["auto", "aws", "gcp"], default="auto")
    agent.add_argument("--aws-endpoint", default="http://169.254.169.254", help="IMDS base URL")
    agent.add_argument("--gcp-endpoint", default="http://metadata.google.internal", help="GCE metadata base URL")
    agent.add_argument("--ray-address", default="auto", help="the cluster's GCS address")
    agent.add_argument("--node-id", help="the Ray node to drain (default: the one on this machine)")
    agent.add_argument(
        "--sigterm-grace",
        type=float,
        default=25.0,
        help="seconds between a SIGTERM and the kill (the pod's terminationGracePeriodSeconds, less a margin)",
    )
    agent.add_argument(
        "--rebalance", choices=["drain", "ignore"], default="drain", help="AWS rebalance recommendation: drain now or ignore"
    )
    agent.add_argument(
        "--drain-now",
        action="store_true",
        help="drain at once with --sigterm-grace seconds left and wait for the workers to leave (a preStop hook)",
    )
    agent.set_defaults(func=cmd_spot_agent, light=True)

    from orchestrator.ops.supervise import add_arguments

    supervise = sub.add_parser("supervise", help="submit the job and resubmit it when it fails or the head is replaced")
    add_arguments(supervise)
    supervise.set_defaults(func=cmd_supervise)

    validate = sub.add_parser("validate", help="render the validation prompts for a checkpoint or adapter file")
    validate.add_argument("--checkpoint", type=Path, required=True, help="checkpoint-N folder or adapter .safetensors")
    validate.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    validate.add_argument("--out", type=Path, help="output folder (default <output_dir>/validation/<name>)")
    add_set_flag(validate)
    validate.set_defaults(func=cmd_validate)

    launch = sub.add_parser("launch", help="run the job data-parallel on Ray (a local cluster unless RAY_ADDRESS)")
    launch.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    launch.add_argument("--cluster", type=Path, help="cluster.json: workers, storage_path, failure limits")
    add_set_flag(launch)
    add_set_flag(launch, "--cluster-set", "cluster")
    launch.set_defaults(func=cmd_launch)

    demo = sub.add_parser("demo", help="tiny model + demo images, then launch configs/demo on a local Ray cluster")
    add_set_flag(demo)
    add_set_flag(demo, "--cluster-set", "cluster")
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    return base.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())

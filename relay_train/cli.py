"""`relay`: the project's one command line. Choose a file and a few overrides; the rest lives in config."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from collections.abc import Callable

from relay_train.exit_codes import Exit, by_signal
from relay_train.logs import configure_logging
from relay_train.config.overrides import add_set_flag, config_overrides, parse_overrides

log = logging.getLogger("relay")


CONFIG_FLAG_COMMANDS = ("train", "launch", "demo")
"""Subcommands that also take config keys as SimpleTuner-style flags (--key=value, --key value)."""


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to checkpoint and return at the next step boundary.

    A second signal while that checkpoint is being written only says so: the write finishes, then the
    run stops (a third abandons it: the partial folder is removed, the previous checkpoint stays). A
    second signal before the checkpoint began aborts at once (exit 130) without writing anything."""

    def __init__(self, is_saving: Callable[[], bool] = lambda: False) -> None:
        self.requested, self.is_saving, self.pressed_while_saving = False, is_saving, 0
        self.signum = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def finished(self) -> None:
        """The loop has returned: a late signal (the second of a double Ctrl-C) has nothing left to stop.
        Ignored at the OS level, not by a Python handler: the interpreter's shutdown puts back the default
        action of every Python handler, and a signal then would kill the process instead of exit 130."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self.signum = True, signum
            log.warning("signal %d: checkpointing at the next step boundary, then stopping (send again to abort)", signum)
            return
        if self.is_saving() and not self.pressed_while_saving:
            self.pressed_while_saving += 1
            log.warning(
                "signal %d: still writing the checkpoint; stopping as soon as it is complete (send once more "
                "to abandon it: the previous checkpoint stays)",
                signum,
            )
            return
        raise KeyboardInterrupt

    def __call__(self, step: int) -> bool:
        return self.requested


def cmd_train(args: argparse.Namespace) -> int:
    from relay_train.config import load_config
    from relay_train.config.notes import launch_only_note

    config = load_config(args.config, config_overrides(args.set, args.config_flags))  # refused before torch loads
    from relay_train.checkpoint import RunLock
    from relay_train.progress import ProgressDisplay
    from relay_train.threads import size_threads
    from relay_train.trainer import Hooks, build_trainer

    for note in config.mapping_notes():
        log.info("config: %s", note)
    for warning in config.pending_features():
        log.warning("config: %s", warning)
    if note := launch_only_note(config):
        log.warning("config: %s", note)
    size_threads(config.cpu_threads, who="relay train")
    stop = StopOnSignal()
    hooks = Hooks(should_stop=stop)
    with RunLock(config.output_dir):  # one run per output_dir, held until this process ends
        trainer = build_trainer(config, hooks=hooks)
        stop.is_saving = lambda: trainer.saving
        with ProgressDisplay(trainer.total_steps, start_step=trainer.step) as progress:
            hooks.on_step = progress
            try:
                result = trainer.fit()
            finally:
                stop.finished()
    if result.stopped_early:
        log.warning(
            "stopped at step %d/%d; %s holds everything. Run the same command to resume.",
            result.step,
            result.total_steps,
            result.last_checkpoint,
        )
        return by_signal(stop.signum) if stop.signum else Exit.OK  # as relay launch
    log.info("done: %d steps; adapter: %s", result.step, ", ".join(map(str, result.exported)))
    return Exit.OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from relay_train.demo.tiny_model import make_pipeline

    path = make_pipeline(args.path, preset=args.preset, seed=args.seed)
    log.info("wrote a random %s SD3 pipeline to %s", args.preset, path)
    return Exit.OK


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from relay_train.demo.data import make_demo_dataset

    path = make_demo_dataset(args.path, count=args.count, seed=args.seed)
    log.info("wrote %d captioned demo images to %s", args.count, path)
    return Exit.OK


def cmd_precompute(args: argparse.Namespace) -> int:
    """`relay precompute --config C [--set k=v ...]`: build the caches in this process (one GPU or the CPU)."""
    from relay_train.config import load_config
    from relay_train.data.encode import build_missing
    from relay_train.data.plan import plan_dataset
    from relay_train.model import compute_dtype, pick_device, resolve_model_path

    config = load_config(args.config, parse_overrides(args.set))
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    device = pick_device()
    start = time.perf_counter()
    plan = plan_dataset(config, model_path)
    stats = build_missing(plan, model_path, device, compute_dtype(config, device))
    log.info(
        "precompute done in %.1fs: %d latent(s), %d text embedding(s) encoded, %d failed, %d bad file(s) skipped",
        time.perf_counter() - start,
        stats.latents,
        stats.text,
        stats.failed,
        plan.problems,
    )
    return Exit.OK


def build_parser(extend: Callable[[argparse._SubParsersAction], None] | None = None) -> argparse.ArgumentParser:
    """The trainer's subcommands; `extend` adds the orchestrator's (relay_train itself never imports Ray)."""
    parser = argparse.ArgumentParser(prog="relay", description="Terminus Relay: SD3.5 Medium LoKr training")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train in this process (CPU or one GPU)")
    train.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    add_set_flag(train)
    train.set_defaults(func=cmd_train)

    tiny = sub.add_parser("make-tiny-model", help="write a random-weight SD3 pipeline")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--preset", choices=["tiny", "sd35m"], default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)

    data = sub.add_parser("make-demo-data", help="write captioned demo images in several aspect ratios")
    data.add_argument("path", type=Path)
    data.add_argument("--count", type=int, default=36)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_make_demo_data)
    pre = sub.add_parser("precompute", help="build the latent and text-embedding caches in this process")
    pre.add_argument("--config", type=Path, required=True, help="SimpleTuner-style config.json")
    add_set_flag(pre)
    pre.set_defaults(func=cmd_precompute)
    if extend:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extend: Callable[[argparse._SubParsersAction], None] | None = None) -> int:
    parser = build_parser(extend)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "light", False):  # a command that never trains (`relay status`): no torch, no diffusers
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        configure_logging(args.verbose)
        return args.func(args)  # it maps its own errors to exit codes
    from relay_train.failures import known_failure

    if extra and args.command not in CONFIG_FLAG_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_flags = extra  # config keys as flags: checked with the config, all problems at once
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.error(
            "interrupted before a checkpoint was complete: nothing was lost beyond the steps since the newest "
            "complete checkpoint, which is kept; run the same command to resume from it"
        )
        return Exit.SIGINT
    except Exception as exc:
        known = known_failure(exc)  # the one map from a failure to its exit code (relay_train/failures.py)
        if known is None:
            raise  # a bug: its traceback, exit 1
        log.error("%s", known.message, exc_info=args.verbose)
        return known.code


if __name__ == "__main__":
    sys.exit(main())

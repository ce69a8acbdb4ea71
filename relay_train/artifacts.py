"""The run's names, each defined once: checkpoint folders and the files in them, the exported adapters,
the run's own folder in storage, the validation results, the Hub repo's layout; and what makes a
checkpoint "committed". The trainer and the orchestrator both import them from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay_train.config import TrainConfig

# -- a checkpoint folder: checkpoint-<step>/ (local output_dir, storage_path/<run>/, Hub checkpoints/) --
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"  # written last: its presence is what "committed" means (is_committed)
ADAPTER, ADAPTER_EMA = "adapter.safetensors", "adapter_ema.safetensors"
OPTIMIZER, SCHEDULER, RNG = "optimizer.pt", "scheduler.pt", "rng_state.pt"
TRAINING_STATE, CONFIG = "training_state.json", "config.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def step_of(name: str) -> int | None:
    """The step a `checkpoint-<step>` folder name holds; None for any other name."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def is_committed(exists: Callable[[str], bool], folder: str) -> bool:
    """A checkpoint folder is committed when its manifest is there: the writer puts it last (after every
    file it lists), so a folder torn by a crash or a dying upload never counts. `exists(path)` asks the
    store in question (a local folder, storage, a Hub listing); its hashes are checked when it is loaded."""
    return exists(f"{folder.rstrip('/')}/{MANIFEST}")


# -- the exported adapters (output_dir, and the Hub repo's root) --------------------------------------


def run_name(config: TrainConfig) -> str:
    """The run's name: tracker_run_name, else output_dir's folder name."""
    return config.tracker_run_name or Path(config.output_dir).name or "relay"


def adapter_names(name: str) -> tuple[str, str]:
    """The final adapter's file name and its EMA twin's, for run `name`, as the model card ships them."""
    base = f"sd35-{name}-lokr"
    return f"{base}.safetensors", f"{base}-ema.safetensors"


def base_model_name(model: str) -> str:
    """A Hub id as is; a local folder by its name only (never the training machine's path)."""
    path = Path(model).expanduser()
    if not path.is_absolute() and not model.startswith((".", "~")) and model.count("/") == 1 and not path.is_dir():
        return model
    return path.resolve().name or model


# -- the run's folder in storage: <storage_path>/<run>/ (Ray's checkpoints beside our relay/) ----------
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it beside the run's checkpoints
OURS = "relay"  # everything of ours under the run folder
VALIDATION_DIR = f"{OURS}/validation"
BENCHMARK = "base"  # the validation of the base model, the reference for every later step
GRID, SCORES = "grid.png", "scores.json"  # scores.json is written last: its presence means done


def validation_folder(job: int | str) -> str:
    """Where a validation's images, grid.png and scores.json go, relative to the run folder."""
    return f"{VALIDATION_DIR}/{BENCHMARK}" if job == BENCHMARK else f"{VALIDATION_DIR}/{checkpoint_name(int(job))}"


# -- the Hub repo --------------------------------------------------------------------------------------
HUB_CHECKPOINTS, HUB_VALIDATION, HUB_CARD = "checkpoints", "validation", "README.md"
HUB_CHECKPOINT_DIR = re.compile(rf"^{HUB_CHECKPOINTS}/{CHECKPOINT_PREFIX}(\d+)/")
HUB_VALIDATION_DIR = re.compile(rf"^{HUB_VALIDATION}/step-(\d+)/")


def hub_checkpoint_folder(step: int) -> str:
    return f"{HUB_CHECKPOINTS}/{checkpoint_name(step)}/"


def hub_validation_folder(step: int) -> str:
    return f"{HUB_VALIDATION}/step-{step}/"


def hub_committed_steps(files: set[str] | frozenset[str]) -> set[int]:
    """The steps of the committed checkpoints in a Hub repo's recursive file listing; a folder without
    its manifest is a torn upload and does not count."""
    steps = (m for f in files if (m := HUB_CHECKPOINT_DIR.match(f)))
    return {int(m.group(1)) for m in steps if is_committed(files.__contains__, m.group(0))}

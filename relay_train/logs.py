"""One logging setup for every process of a run (see configure_logging).

The libraries' own chatter (diffusers' and transformers' progress bars and notices, LyCORIS' INFO lines,
DeepSpeed's accelerator warning) is quieted when each library is first imported, not by importing them
here: a process that never trains or renders (`relay status`, a launch driver, a refused config) never
pays their ~3.5 CPU-s of imports.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import warnings
from collections.abc import Callable


def configure_logging(verbose: bool = False) -> None:
    """Our lines at INFO; the libraries' own progress bars and chatter only with --verbose. The one logging
    setup of every process: the CLI, jobs/, Ray workers, the steward and the validation actors."""
    handlers = None
    if sys.stderr.isatty():  # rich writes through the live progress bar, so lines land above it
        from rich.console import Console
        from rich.logging import RichHandler

        handlers = [RichHandler(console=Console(stderr=True), show_path=False)]
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=handlers,
        format="%(name)s: %(message)s" if handlers else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbose:
        return
    # bitsandbytes warns at import that it has no 4-bit CPU kernels (we use its 8-bit Adam only)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_on_import(QUIETERS)


def _diffusers() -> None:
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def _transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _lycoris() -> None:
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # lycoris.logging sets INFO at its import


def _before_deepspeed() -> None:
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed would pick anyway, said so it does not warn at import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# module → (before its first import, after it); a module already imported is quieted at once
QUIETERS: dict[str, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {
    "diffusers": (None, _diffusers),
    "transformers": (None, _transformers),
    "lycoris.logging": (None, _lycoris),
    "deepspeed": (_before_deepspeed, None),
}


class _Quieted(importlib.abc.Loader):
    """A module's own loader, with an action before and after it runs the module."""

    def __init__(self, loader, before, after):
        self.loader, self.before, self.after = loader, before, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.before:
            self.before()
        self.loader.exec_module(module)
        if self.after:
            self.after()

    def __getattr__(self, name):  # resource readers and the rest: the module's own loader
        return getattr(self.loader, name)


class _QuietOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, actions: dict) -> None:
        self.actions = dict(actions)

    def find_spec(self, name, path, target=None):
        actions = self.actions.get(name)  # kept: a find_spec without an import (availability checks) runs nothing
        if actions is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Quieted(spec.loader, *actions)
                return spec
        return None


def quiet_on_import(actions: dict) -> None:
    """Run each module's (before, after) actions around its first import; for one already imported, the
    after action now. Once per process: a second call adds only modules not yet seen."""
    pending = {}
    for name, (before, after) in actions.items():
        if name in sys.modules:
            if after:
                after()
        else:
            pending[name] = (before, after)
    hook = next((f for f in sys.meta_path if isinstance(f, _QuietOnImport)), None)
    if hook is None:
        sys.meta_path.insert(0, _QuietOnImport(pending))
    else:
        for name, act in pending.items():
            hook.actions.setdefault(name, act)

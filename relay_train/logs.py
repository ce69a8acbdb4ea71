"""One logging setup for every process of a run (see configure_logging)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def configure_logging(verbose: bool = False, libraries: bool = True) -> None:
    """Our lines at INFO; the libraries' own progress bars and chatter only with --verbose. The one logging
    setup of every process: the CLI, jobs/, Ray workers, the steward and the validation actors.
    `libraries=False` skips quieting diffusers/transformers (a process that never imports them)."""
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
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not libraries:
        return
    # before the imports below: bitsandbytes warns at import that it has no 4-bit CPU kernels (we use its
    # 8-bit Adam only), and DeepSpeed that it fell back to the CPU accelerator
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed would pick anyway, said so it does not warn
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import diffusers
    import lycoris.logging  # noqa: F401  (it sets its own level at import: import before overriding)
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

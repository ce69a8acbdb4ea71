"""The one logging setup: it imports no ML library itself, and quiets each one when it is first imported."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import logging, sys
from relay_train.logs import configure_logging
from relay_train.config import load_config
configure_logging()
load_config("configs/demo/config.json", {})  # what a refused config costs: no torch, no diffusers
print(sorted(m for m in ("torch", "diffusers", "transformers", "lycoris", "bitsandbytes") if m in sys.modules))
import diffusers, lycoris, transformers
print(diffusers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())
print(transformers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled())
print(logging.getLogger("LyCORIS").level)
"""


def test_logging_imports_no_library_and_quiets_each_on_its_first_import() -> None:
    got = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, diffusers, transformers, lycoris = got.stdout.strip().splitlines()
    assert before == "[]"
    assert diffusers == "40 False" and transformers == "40 False"  # logging.ERROR, no progress bars
    assert lycoris == "30"  # WARNING, over the INFO lycoris.logging sets at its import
    assert "LyCORIS" not in got.stderr


def test_a_library_imported_before_the_setup_is_quieted_at_once() -> None:
    probe = "import diffusers\nfrom relay_train.logs import configure_logging\nconfigure_logging()\n"
    probe += "print(diffusers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled())"
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert got.stdout.strip() == "40 False"

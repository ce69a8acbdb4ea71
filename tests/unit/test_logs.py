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


def test_the_hook_acts_around_a_first_import_not_a_lookup_and_at_once_for_a_loaded_module(tmp_path, monkeypatch) -> None:
    import importlib.util

    from relay_train.logs import quiet_on_import

    seen: list[str] = []
    monkeypatch.setattr(sys, "relay_probe_seen", seen, raising=False)
    (tmp_path / "relay_probe_quiet.py").write_text("import sys\nsys.relay_probe_seen.append('body')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    quiet_on_import({"relay_probe_quiet": (lambda: seen.append("before"), lambda: seen.append("after"))})
    assert importlib.util.find_spec("relay_probe_quiet") is not None and seen == []  # a lookup runs nothing
    import relay_probe_quiet  # noqa: F401

    assert seen == ["before", "body", "after"]
    quiet_on_import({"json": (lambda: seen.append("json before"), lambda: seen.append("json after"))})
    assert seen[-1] == "json after" and "json before" not in seen  # already imported: quieted at once
    monkeypatch.delitem(sys.modules, "relay_probe_quiet")

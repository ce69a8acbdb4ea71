"""strategy deepspeed reads ZeRO-2's internal state layout, so DeepSpeed is pinned exactly: the pin,
the installed version and the internals it reads must agree."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from relay_train.zero import DEEPSPEED_VERSION

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_pin_the_install_and_the_code_agree() -> None:
    pins = re.findall(r'"deepspeed==([^"]+)"', PYPROJECT.read_text())
    assert pins == [DEEPSPEED_VERSION]
    assert version("deepspeed") == DEEPSPEED_VERSION


def test_the_internals_zero_reads_still_exist() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for name in ("_lazy_init_hp_params_optimizer_state", "refresh_fp32_params"):
        assert callable(getattr(DeepSpeedZeroOptimizer, name, None)), name
    import inspect

    source = inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    for attribute in ("bit16_groups", "single_partition_of_fp32_groups", "_hp_optimizer_states_linked"):
        assert f"self.{attribute}" in source, attribute
    from deepspeed.utils import safe_get_full_optimizer_state  # noqa: F401  (public, used on save)

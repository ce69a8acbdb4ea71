"""Class: user strings used as path parts. One rule (relay_train/config/names.py) for every name that
becomes a folder or file name, checked when each command reads its config."""

from __future__ import annotations

import pytest

from orchestrator.core.cluster import load_cluster_config
from orchestrator.core.store import RunStorage
from relay_train.config import ConfigError, parse_config
from relay_train.config.names import path_part_problem
from support.configs import raw_config

BAD_NAMES = ["a/b", "../escape", "..", ".", "x\ny", "tab\there", "back\\slash", "", "bell\x07", "rtl\u202eexe"]
GOOD_NAMES = ["terminus-relay-v2", "run.1", "日本語の実行", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_name_is_refused_by_the_one_rule(name):
    assert path_part_problem(name) is not None


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_a_plain_name_passes(name):
    assert path_part_problem(name) is None


@pytest.mark.parametrize("name", ["a/b", "../x", "x\nINFO relay: done"])
def test_tracker_run_name_is_checked_at_config_time(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(tmp_path, **{"--tracker_run_name": name}), tmp_path)
    assert "tracker_run_name" in str(err.value)


@pytest.mark.parametrize("out", ["out\nINFO relay: done: 300 steps", "runs/..", "out\x1b[2J"])
def test_output_dir_that_would_forge_lines_or_name_no_run_is_refused(tmp_path, out):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(tmp_path, **{"--output_dir": out}), tmp_path)
    message = str(err.value)
    assert "output_dir" in message and "\nINFO relay: done" not in message  # shown escaped, never as a line


@pytest.mark.parametrize("name", ["../NAME", "a/b", "x\ny"])
def test_the_cluster_run_name_is_checked(name):
    with pytest.raises(ConfigError, match="run_name"):
        load_cluster_config(None, {"run_name": name})


def test_run_storage_never_takes_a_path_as_a_run_name(tmp_path):
    with pytest.raises(ValueError, match="run name"):
        RunStorage(str(tmp_path), "../outside")
    assert RunStorage(str(tmp_path), "fine").describe().endswith("/fine")

"""The driver's checks before any worker starts: paths under `ray job submit --working-dir`, and what a
resubmission does with a run (orchestrator.run.preflight)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.preflight import in_ray_working_dir_copy, path_problems, refusal_line, resume_decision

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_copy(tmp_path, monkeypatch) -> Path:
    """The submitted folder as Ray lays it out for a job: configs/ uploaded, demo/ and output/ not
    (the repository's .gitignore lists them), and the job's cwd in the copy."""
    root = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    shutil.copytree(REPO / "configs/demo", root / "configs/demo")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    monkeypatch.chdir(root)
    return root


def test_the_working_dir_copy_is_recognised_by_its_path(ray_copy, tmp_path):
    assert in_ray_working_dir_copy(ray_copy)
    assert not in_ray_working_dir_copy(REPO)
    assert not in_ray_working_dir_copy(tmp_path)


def test_the_demo_configs_in_ray_copy_are_refused_naming_each_path_and_the_fix(ray_copy):
    from relay_train.config import load_config

    config = load_config(ray_copy / "configs/demo/config.json")
    problems = path_problems(config, ClusterConfig(storage_path="output/ray"))
    text = "\n".join(problems)
    assert len(problems) == 4, text  # storage_path, output_dir, the model, the images
    assert "storage_path 'output/ray' is relative" in text and "Ray's temporary copy" in text and "s3://" in text
    assert "output_dir 'output/demo' is relative" in text
    assert "pretrained_model_name_or_path: no model folder at demo/tiny-sd3: .gitignore lists it" in text
    assert "demo-images.instance_data_dir: no image folder at demo/data: .gitignore lists it" in text
    assert "/tmp/" not in text and "_ray_pkg_" not in text  # the temporary folder is never shown


def test_absolute_paths_in_ray_copy_pass(ray_copy, tmp_path, tiny_model, demo_data):
    from relay_train.config import load_config

    config = load_config(
        ray_copy / "configs/demo/config.json",
        {"output_dir": str(tmp_path / "out"), "pretrained_model_name_or_path": str(tiny_model)},
    )
    config.data_backends[0].instance_data_dir = str(demo_data)
    assert path_problems(config, ClusterConfig(storage_path=str(tmp_path / "runs"))) == []
    assert path_problems(config, ClusterConfig(storage_path="s3://bucket/runs")) == []


def test_outside_ray_copy_relative_paths_are_the_users_own(tmp_path, monkeypatch, tiny_model, demo_data):
    """`relay launch` from a checkout: relative paths mean that folder, which stays."""
    from relay_train.config import load_config

    shutil.copytree(REPO / "configs/demo", tmp_path / "configs/demo")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo/tiny-sd3").symlink_to(tiny_model)
    (tmp_path / "demo/data").symlink_to(demo_data)
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "configs/demo/config.json")
    assert path_problems(config, ClusterConfig(storage_path="output/ray")) == []
    shutil.rmtree(tmp_path / "demo")
    # demo/tiny-sd3 is also a Hub id's shape: the workers look it up on the Hub
    assert [p.split(":")[0] for p in path_problems(config, ClusterConfig())] == ["demo-images.instance_data_dir"]


def test_a_resubmission_of_a_completed_run_is_done_and_a_shorter_one_refused_with_advice_that_works():
    assert resume_decision("r", None, 300, None).action == "train"  # a new run
    assert resume_decision("r", 300, None, 300).action == "train"  # epochs: the workers count them
    done = resume_decision("r", 300, 300, 300)
    assert done.action == "done" and "already completed at step 300" in done.message
    assert resume_decision("r", 300, 300, None).action == "train"  # its end was never recorded: finish it
    assert resume_decision("r", 300, 400, 300).action == "train"  # more steps: continue
    refused = resume_decision("r", 300, 200, 300)
    assert refused.action == "refuse"
    assert "set max_train_steps to 300 or more" in refused.message and "--cluster-set run_name=NEW" in refused.message
    assert "resume_from_checkpoint none" not in refused.message  # refused itself on an existing run


def test_a_refusal_is_one_line_for_a_webhook():
    from relay_train.config import ConfigError

    line = refusal_line(ConfigError(["first problem", "second\nproblem"], source="x"))
    assert line == "first problem; second problem"


def test_a_workers_error_reads_without_ray_temporary_paths_or_a_traceback():
    text = (
        "cannot resume from /tmp/checkpoint_tmp_0a1b2c/checkpoint-300: the checkpoint is already at step 300\n"
        "  model at /tmp/ray/session_2026-12-04_19-00-00_1_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd/demo/x\n"
        "Traceback (most recent call last):\n  File ..."
    )
    line = refusal_line(text)
    assert line == "cannot resume from checkpoint-300: the checkpoint is already at step 300 model at demo/x"

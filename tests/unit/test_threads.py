"""The CPU thread policy (relay_train/threads.py): each process runs as many torch/OpenMP threads as CPUs it was given."""

from __future__ import annotations

import os

import pytest
import torch

from relay_train.threads import machine_cpus, size_threads, thread_count


@pytest.fixture
def no_omp_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_the_key_wins_then_the_cpus_given_rounded_down_never_below_one(no_omp_env):
    assert thread_count(configured=3, given_cpus=0.5) == 3
    assert thread_count(given_cpus=0.66) == 1  # the demo's share of 2 cores: 1 thread, not the machine's 2
    assert thread_count(given_cpus=2.5) == 2
    assert thread_count(given_cpus=8) == 8


def test_nothing_given_reads_omp_num_threads_then_the_machine(monkeypatch, no_omp_env):
    assert thread_count() == max(1, int(machine_cpus()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_count() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a count: the machine decides
    assert thread_count() == max(1, int(machine_cpus()))


def test_a_container_quota_caps_the_machine(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs
    assert machine_cpus(cpu_max) == min(1.5, len(os.sched_getaffinity(0)))
    cpu_max.write_text("max 100000\n")
    assert machine_cpus(cpu_max) == len(os.sched_getaffinity(0))
    assert machine_cpus(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_size_threads_sets_torch_and_the_environment_children_inherit(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # monkeypatch restores the variable afterwards
    try:
        assert size_threads(given_cpus=1.0) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)

"""Sizing on a cluster that cannot grow (orchestrator.run.resources.fit_cpus): the demo's 2 workers and its
validation actor share a 2-CPU head as `relay demo` does; a request asked for on purpose is never shrunk."""

from __future__ import annotations

from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.resources import fit_cpus

HEAD_2_CPU = [{"CPU": 2.0, "memory": 8e9}]


def test_the_demo_cluster_fits_a_two_cpu_head_by_sharing_its_cpus(make_config):
    config = make_config(validation_steps=50)  # validation on: 2 workers + 1 actor at 1 CPU each ask for 3
    fitted = fit_cpus(config, ClusterConfig(num_workers=2, cpus_per_worker=1), HEAD_2_CPU, gpus=0)
    assert fitted is not None and fitted.cpus_per_worker == 0.66 and fitted.validation_cpus == 0.66


def test_what_sharing_cannot_fit_is_left_to_the_refusal(make_config):
    config = make_config(validation_steps=50)
    assert fit_cpus(config, ClusterConfig(num_workers=2, cpus_per_worker=4), HEAD_2_CPU, gpus=0) is None  # on purpose
    assert fit_cpus(config, ClusterConfig(num_workers=2, use_gpu=True), HEAD_2_CPU, gpus=0) is None  # no GPU to share
    custom = ClusterConfig(num_workers=1, resources_per_worker={"spot": 1})
    assert fit_cpus(config, custom, HEAD_2_CPU, gpus=0) is None

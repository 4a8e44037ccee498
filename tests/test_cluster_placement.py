"""Whether the cluster can hold the workers, decided before Ray would wait forever."""

import pytest

from launch.placement import check_capacity, workers_that_fit
from spec.config import load_job_config
from spec.errors import LongtrainError

TWO_NODES = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]


def _cluster(*overrides):
    return load_job_config(None, list(overrides)).cluster


@pytest.mark.parametrize("strategy, expected", [("PACK", 4), ("SPREAD", 4), ("STRICT_PACK", 2), ("STRICT_SPREAD", 2)])
def test_workers_that_fit_follow_the_strategy(strategy, expected):
    cluster = _cluster(f"cluster.placement_strategy={strategy}", "cluster.cpus_per_worker=4")
    assert workers_that_fit(cluster, TWO_NODES, use_gpu=True) == expected


def test_a_worker_cannot_span_nodes():
    cluster = _cluster("cluster.gpus_per_worker=4", "cluster.num_workers=1")
    assert workers_that_fit(cluster, TWO_NODES, use_gpu=True) == 0
    with pytest.raises(LongtrainError, match=r"room for 0; set cluster.num_workers=1 or smaller"):
        check_capacity(cluster, TWO_NODES, True, "the Ray cluster at auto")


def test_gpu_job_without_gpus_names_the_fix():
    cluster = _cluster("cluster.num_workers=2")
    with pytest.raises(LongtrainError) as error:
        check_capacity(cluster, [{"CPU": 8.0}], True, "this machine's Ray")
    message = str(error.value)
    assert "\n" not in message and "0 GPUs" in message and "cluster.use_gpu=false" in message
    check_capacity(cluster, [{"CPU": 8.0}], False, "this machine's Ray")  # the same job on CPUs fits


def test_unknown_strategy_is_a_config_error():
    from spec.errors import ConfigError

    with pytest.raises(ConfigError, match="cluster.placement_strategy"):
        _cluster("cluster.placement_strategy=DENSE")

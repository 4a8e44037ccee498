"""The Ray Train parts a run starts: no Ray Datasets actor (a run passes no datasets), and on a local run no
placement-group cleaner (its private head ends with the driver) and no autoscaling coordinator (it has no
autoscaler); the rest as Ray Train makes them. Each dropped part is an actor process of its own (3-4 CPU-seconds a
run). Fails if a Ray upgrade renames or reorders the parts (`launch.ray_train` picks them from
`_create_default_callbacks`). About 2 s, no Ray started; `tests/test_ray_loopback.py` checks a real run's
processes."""

import pytest

RAY_TRAIN_PARTS = ["AcceleratorSetupCallback", "BackendSetupCallback", "PlacementGroupCleanerCallback",
                   "DatasetsCallback", "WorkingDirectorySetupCallback", "ControllerMetricsCallback",
                   "WorkerMetricsCallback", "UserCallbackHandler"]


def _parts(trainer_type) -> list:
    from ray.train import ScalingConfig

    trainer = trainer_type(lambda config: None, scaling_config=ScalingConfig(num_workers=2))
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


@pytest.mark.parametrize("address, dropped", [("local", {"DatasetsCallback", "PlacementGroupCleanerCallback"}),
                                              ("10.0.0.1:6379", {"DatasetsCallback"})])
def test_a_run_starts_the_ray_train_parts_it_uses(address, dropped):
    from ray.train.torch import TorchTrainer

    from launch.ray_train import trainer_type
    from spec.config import load_job_config

    cluster = load_job_config(None, [f"cluster.address={address}"]).cluster
    assert _parts(TorchTrainer) == RAY_TRAIN_PARTS  # Ray Train's own, which the dropped names must be among
    assert _parts(trainer_type(cluster)) == [part for part in RAY_TRAIN_PARTS if part not in dropped]


def test_a_local_run_asks_for_its_workers_without_an_autoscaling_coordinator():
    """The same decisions as Ray Train's fixed scaling policy, from a controller that started no coordinator actor
    (Ray not even initialized: Ray Train's own policy would start one in `after_controller_start` and assert on
    it when deciding)."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    from launch.ray_train import LocalScalingPolicy

    scaling = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})
    policy = LocalScalingPolicy(scaling)
    policy.after_controller_start(None)
    assert policy.make_decision_for_non_running_worker_group() == \
        ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    with pytest.raises(AssertionError):  # Ray Train's own needs its coordinator
        FixedScalingPolicy(scaling).make_decision_for_non_running_worker_group()
    assert not ray.is_initialized()


def test_a_planned_allocator_run_sets_the_workers_up_through_its_own_torch_backend():
    """train.allocator=planned: Ray Train's backend setup (run on the workers before the process group and the
    loop) is ours, which installs the replay allocator first; it runs on GPU workers (tests/test_replay_allocator_gpu.py
    and the lent-GPU `longtrain train` runs in docs/log.md)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.torch.config import _TorchBackend

    from launch.ray_train import PlannedAllocatorConfig, _PlannedAllocatorBackend

    trainer = TorchTrainer(lambda config: None, torch_config=PlannedAllocatorConfig(backend="nccl"),
                           scaling_config=ScalingConfig(num_workers=2))
    setup = [c for c in trainer._create_default_callbacks() if type(c).__name__ == "BackendSetupCallback"]
    assert len(setup) == 1 and type(setup[0]._backend) is _PlannedAllocatorBackend
    assert issubclass(_PlannedAllocatorBackend, _TorchBackend)

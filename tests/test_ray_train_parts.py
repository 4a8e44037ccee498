"""The Ray Train parts a run starts: no Ray Datasets actor (a run passes no datasets), and on a local run no
placement-group cleaner (its private head ends with the driver); the rest as Ray Train makes them. Each dropped
part is an actor process of its own (~4 CPU-seconds a run). Fails if a Ray upgrade renames or reorders the parts
(`launch.ray_train` picks them from `_create_default_callbacks`). About 2 s, no Ray started."""

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

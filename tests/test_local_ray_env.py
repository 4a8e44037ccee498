"""The private Ray of a local run: its runtime env turns off Ray Train's preemption watcher (nothing to drain on one
machine), has the controller poll its workers every 0.5 s, and keeps every variable the run passes, which win over
ours. Instant."""

from launch import loopback
from launch.ray_train import _local_runtime_env


def test_a_local_run_starts_no_preemption_watcher_and_keeps_the_runs_variables():
    env = _local_runtime_env({"env_vars": {"OMP_NUM_THREADS": "1"}})
    assert env["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                               "OMP_NUM_THREADS": "1"}
    assert env["worker_process_setup_hook"] == loopback.WORKER_SETUP_HOOK
    assert _local_runtime_env({"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}})["env_vars"] == {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

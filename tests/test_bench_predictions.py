"""What `longtrain bench` predicts for its rows (the GPU measures them; the predictions are made on any machine)."""

from launch.bench_command import parse_policy
from launch.measure.bench import BenchOptions, BenchRow, LayerStack, _apply_longtrain_plan
from launch.measure.calibration import bench_job, predict
from spec.hardware import load_profile


def test_a_hand_policy_row_gets_the_planners_prediction():
    """`--policy` rows print predicted step and peak like plan rows (the calibration's `predict` of the policy in
    every layer), so a report can set every row beside the planner."""
    profile = load_profile("h200")
    options = BenchOptions(hand_policy=parse_policy("0/1/0/host"), elementwise="compiled")
    job = bench_job(2, 4096, "debug", options.job_overrides())
    row = BenchRow("longtrain", 4096, "ok")
    runtime = _apply_longtrain_plan(LayerStack(job), job, profile, row, use_arena=False, options=options)
    assert runtime is not None and "hand policy" in row.note
    expected = predict(4096, 2, list(runtime.layers.values()), profile, "debug", ["train.elementwise=compiled",
                                                                                 "train.attention_kernel=sdpa"])
    assert (row.predicted_step_seconds, row.predicted_peak_gib) == (expected.step_seconds, expected.peak_gib)
    assert row.predicted_step_seconds > 0 and row.predicted_peak_gib > 0

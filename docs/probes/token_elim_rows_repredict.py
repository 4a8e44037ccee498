"""Re-predict recorded `longtrain_token_elim` bench rows with the planner as it is now (the bench's own plan
arithmetic: `launch.measure.bench._apply_longtrain_plan`), against what was measured:

    python3 docs/probes/token_elim_rows_repredict.py profiles/runs/h200_2026-12-03_token-elim-trace/after-extras.json
"""

import json
import sys

from launch.measure.bench import TOKEN_ELIM
from launch.measure.calibration import bench_job, not_in_bench_bytes
from planner.cost_model import CostModel
from planner.planning import make_plan
from spec.config import TokenElimConfig
from spec.hardware import load_profile
from spec.units import GIB


def main(path: str) -> None:
    recorded = json.load(open(path))
    profile = load_profile(recorded["meta"].get("profile", "h200"))
    print("seq      step s: measured  predicted         peak GiB: measured  predicted")
    for row in recorded["rows"]:
        if row["mode"] != "longtrain_token_elim" or row["status"] != "ok":
            continue
        job = bench_job(4, row["seq_len"], overrides=["train.elementwise=compiled", "train.attention_kernel=sdpa"])
        job.token_elim = TokenElimConfig(**TOKEN_ELIM)
        cost = CostModel(job, profile)
        static = cost.static_memory(0)
        job.plan.gpu_memory_fraction = min(0.95, job.plan.gpu_memory_fraction
                                           + static.optimizer_states / (profile.device_memory_gib * GIB))
        outcome = make_plan(job, profile, None)
        step = outcome.policy.micro_batch_seconds - 3 * cost.head_seconds()
        peak = outcome.plan.predicted["peak_gpu_gib"] - not_in_bench_bytes(cost, static) / GIB
        measured_step, measured_peak = row["step_seconds"], row["peak_allocated_gib"]
        print(f"{row['seq_len']:7d}  {measured_step:17.3f}  {step:9.3f} ({step / measured_step - 1:+.1%})"
              f"  {measured_peak:17.1f}  {peak:9.1f} ({peak / measured_peak - 1:+.1%})")


if __name__ == "__main__":
    main(sys.argv[1])

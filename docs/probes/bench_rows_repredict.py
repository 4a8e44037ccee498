"""The planner's peak and step for the bench rows of issue 20's reports, from the decisions each row ran (the
calibration's `predict`), against what the lent H200 measured. Re-run after a planner change:

    python3 docs/probes/bench_rows_repredict.py
"""

from dataclasses import replace

from launch.measure.calibration import predict
from spec.hardware import load_profile
from spec.plan import LayerPlan

COMPILED = ["train.elementwise=compiled"]
ROWS = [  # (what, seq_len, layers, decisions, flags, measured step s, measured peak allocated GiB, where)
    ("3 layers 256K plan, FA4", 262144, 3, [(0.9022, 0.0, 0.0978, False)] * 3,
     COMPILED + ["train.attention_kernel=fa4"], 11.086, 124.5,
     "profiles/runs/h200_2026-12-02_bench-3l-swap-all-again/plan.log"),
    ("3 layers 256K every token swapped, FA4", 262144, 3, [(0.0, 1.0, 0.0, True)] * 3,
     COMPILED + ["train.attention_kernel=fa4"], 11.011, 84.8,
     "profiles/runs/h200_2026-12-02_bench-3l-swap-all-again/swap_all_second_run.log"),
    ("4 layers 128K plan (keeps all), SDPA", 131072, 4, [(1.0, 0.0, 0.0, False)] * 4, COMPILED, 4.701, 73.4,
     "profiles/runs/h200_2026-12-02_bench-arena-duplex/fragmentation/bench.log"),
    ("3 layers 256K every token swapped, SDPA", 262144, 3, [(0.0, 1.0, 0.0, True)] * 3, COMPILED, 12.833, 84.8,
     "profiles/runs/h200_2026-12-03_bench-4l-restore-in-place/swapall.log"),
    ("4 layers 256K plan (layers 0-2 swapped whole), SDPA, 2026-12-03", 262144, 4,
     [(0.0, 1.0, 0.0, True)] * 3 + [(0.60, 0.0, 0.40, False)], COMPILED, 17.202, 102.5,
     "profiles/runs/h200_2026-12-03_bench-4l-restore-in-place/b4.log"),
    ("4 layers 256K plan (layers 0-2 swapped whole), SDPA", 262144, 4,  # the assignment whose step is the
     [(0.0, 1.0, 0.0, True)] * 3 + [(0.46, 0.0, 0.54, False)], COMPILED, 17.235, 98.5,  # recorded 17.056 s
     "profiles/runs/h200_2026-12-02_bench-arena-duplex/fragmentation/bench.log"),
]


def main() -> None:
    profile = load_profile("h200")
    print("row | step predicted / measured | peak predicted / measured GiB")
    for what, seq_len, layers, decisions, flags, step, peak, _ in ROWS:
        plans = [replace(LayerPlan(layer=i), keep_fraction=k, swap_fraction=s, recompute_fraction=r,
                         offload_skeletal=o) for i, (k, s, r, o) in enumerate(decisions)]
        mine = predict(seq_len, layers, plans, profile, overrides=flags)
        print(f"{what} | {mine.step_seconds:.3f} / {step:.3f} ({mine.step_seconds / step - 1:+.1%}) | "
              f"{mine.peak_gib:.1f} / {peak:.1f} ({mine.peak_gib / peak - 1:+.1%})")


if __name__ == "__main__":
    main()

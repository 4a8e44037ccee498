"""The issue-18 rows measured on a lent H200 against today's planner: each longtrain plan that ran, predicted with its
own decisions (`planner.planning.predict_decisions`: the plan files were made by older planners), and the ALST
recipe's prediction (`planner.alst.predict_alst`); the 3B full fine-tuning rows (`--full-3b`: optimizer offloaded)
compare host memory with the process's RSS, which also holds ~2.7 GiB of its own (the planner counts the buffers
only). Prints a Markdown table: predicted / measured / error / target
(step time 10%, peak GPU 5%, host 10%). CPU only, a few seconds.

    python3 docs/probes/llama3_8b_1gpu_repredict.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from docs.probes.llama3_8b_1gpu import overrides  # noqa: E402
from planner.alst import predict_alst  # noqa: E402
from planner.planning import predict_decisions  # noqa: E402
from spec.config import load_job_config  # noqa: E402
from spec.hardware import load_profile  # noqa: E402
from spec.plan import load_plan  # noqa: E402

RUNS = ROOT / "profiles" / "runs"
PLANS = RUNS / "h200_2026-12-01_llama3-8b-1gpu"
FULL_3B = "h200_2026-12-02_llama3-3b-full"
LOW_BUDGETS = ["plan.gpu_memory_fraction=0.55", "plan.host_memory_fraction=0.42"]
ROWS = [  # recipe, tokens, extra overrides, measured rows (jsonl), the step compared; `--full-3b` rows last
    ("longtrain", 131072, [], "h200_2026-12-01_llama3-8b-1gpu/longtrain_128k", 2),
    ("longtrain", 262144, [], "h200_2026-12-02_llama3-8b-1gpu/longtrain_256k", 2),
    ("longtrain", 327680, LOW_BUDGETS, "h200_2026-12-02_llama3-8b-1gpu/longtrain_320k", 1),
    ("longtrain", 393216, ["plan.gpu_memory_fraction=0.9", "plan.host_memory_fraction=0.8"],
     "h200_2026-12-02_llama3-8b-1gpu/longtrain_384k", 1),
    ("alst", 131072, [], "h200_2026-12-01_llama3-8b-1gpu/alst_128k", 2),
    ("alst", 262144, [], "h200_2026-12-02_llama3-8b-1gpu/alst_256k", 1),
    ("longtrain", 131072, [], f"{FULL_3B}/longtrain_128k", 2),
    ("alst", 131072, [], f"{FULL_3B}/alst_128k", 2),
]
TARGETS = {"step time": 0.10, "peak GPU": 0.05, "host": 0.10}


def job(recipe: str, seq_len: int, extra: list, full_3b: bool):
    chosen = overrides(recipe, seq_len, 1, "", False, full_3b) + extra
    return load_job_config(None, [o for o in chosen if not o.startswith("train.stop_at_step")])


def measured(name: str, step: int) -> dict:
    rows = [json.loads(line) for line in (RUNS / f"{name}.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == step)


def main() -> None:
    profile = load_profile("h200_1x_lent")
    print("| recipe, tokens | | predicted | measured | error | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for recipe, seq_len, extra, rows, step in ROWS:
        row, full_3b = measured(rows, step), rows.startswith(FULL_3B)
        if recipe == "longtrain":
            name = f"longtrain_{seq_len // 1024}k.plan.yaml"  # beside the rows, else with the first day's plans
            own = (RUNS / rows).parent / name
            plan = load_plan(own if own.exists() else PLANS / name)
            p = predict_decisions(job(recipe, seq_len, extra, full_3b), profile, plan.layers).predicted
            host = (row["host_rss_gib"], "GiB RSS") if full_3b else (row["swap_host_gib"], "GiB pinned")
            values = {"step time": (p["step_seconds"], row["step_seconds"], "s"),
                      "peak GPU": (p["peak_gpu_gib"], row["peak_allocated_gib"], "GiB allocated"),
                      "host": (p["host_gib"], *host)}
        else:
            a = predict_alst(job(recipe, seq_len, extra, full_3b), profile)
            values = {"step time": (a.step_seconds, row["step_seconds"], "s"),
                      "peak GPU": (a.peak_gpu_gib, row["peak_allocated_gib"], "GiB allocated"),
                      "host": (a.host_gib, row["host_rss_gib"], "GiB RSS")}
        for what, (predicted, actual, unit) in values.items():
            error = predicted / actual - 1
            met = "met" if abs(error) <= TARGETS[what] else "missed"
            name = f"{recipe} {seq_len // 1024}K" + (" 3B full" if full_3b else "")
            print(f"| {name} | {what} | {predicted:.2f} | {actual:.2f} {unit} (step {step}) | "
                  f"{error:+.1%} | {TARGETS[what]:.0%}: {met} |")


if __name__ == "__main__":
    main()

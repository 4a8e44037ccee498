"""`longtrain plan`: an offline memory plan for a job on a hardware profile (pure CPU, seconds)."""

from pathlib import Path
from typing import Optional, Sequence

from launch.paths import check_writable_file
from spec.config import JobConfig, load_job_config
from spec.errors import ConfigError
from spec.hardware import PROFILES_DIR, load_profile
from spec.plan import save_plan
from planner.alst import alst_summary, predict_alst
from planner.longest import longest_line, longest_sequence
from planner.planning import make_plan
from planner.report import plan_summary, plot_layout


def run_planning(config_path: Optional[str], overrides: Sequence[str], profile_name: Optional[str],
                 out: Optional[str], max_seq: bool = False) -> int:
    job = load_job_config(config_path, overrides)
    if job.data.packs_documents:  # the cost model reads the document lengths of the prepared data
        from launch.prepare_command import ensure_prepared

        ensure_prepared(job)
    profile = load_profile(_profile_name(job, profile_name))
    if max_seq:
        print(longest_line(job, profile, longest_sequence(job, profile)))
        return 0
    if job.train.activation_checkpointing == "alst":  # DeepSpeed decides what is kept: a prediction, no plan file
        print(alst_summary(job, profile, predict_alst(job, profile)))
        return 0
    plan_path = Path(out) if out else Path("plans") / f"{_stem(config_path, job)}.plan.yaml"
    check_writable_file(plan_path, "--out" if out else "the plan file")
    outcome = make_plan(job, profile)
    png_path = plan_path.with_suffix(".png")
    save_plan(outcome.plan, plan_path)
    plot_layout(outcome.plan, png_path)
    print(plan_summary(outcome.plan, plan_path, png_path, outcome.seconds))
    return 0


def _profile_name(job: JobConfig, flag: Optional[str]) -> str:
    name = flag or (job.metrics.hardware_profile if job.metrics.hardware_profile != "auto" else None)
    if name is None:
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError("metrics.hardware_profile is auto, which a plan cannot use (plans are made before the "
                          f"GPUs exist); pass --profile NAME or set metrics.hardware_profile (known: {known})")
    return name


def _stem(config_path: Optional[str], job: JobConfig) -> str:
    return Path(config_path).stem if config_path else job.run.name

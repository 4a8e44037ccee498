"""`longtrain plan` (`longtrain.plan`, `longtrain.longest_sequence`): an offline memory plan for a job on a hardware
profile (pure CPU, seconds)."""

from pathlib import Path
from typing import Optional, Sequence

from launch.api import LongestResult, PlanResult
from launch.paths import check_writable_file
from spec.config import JobConfig, load_job_config
from spec.errors import ConfigError
from spec.hardware import PROFILES_DIR, load_profile
from spec.plan import save_plan
from planner.planning import make_plan
from planner.report import plan_summary, plot_layout


def make_plan_files(config_path: Optional[str], overrides: Sequence[str], profile_name: Optional[str],
                    out: Optional[str]) -> PlanResult:
    """`longtrain.plan`: the plan file and its PNG (an ALST job: the prediction only, no file)."""
    from planner.alst import alst_summary, predict_alst

    job, profile = _job_and_profile(config_path, overrides, profile_name)
    if job.train.activation_checkpointing == "alst":  # DeepSpeed decides what is kept: a prediction, no plan file
        prediction = predict_alst(job, profile)
        return PlanResult(job, None, None, None, 0.0, prediction, alst_summary(job, profile, prediction))
    plan_path = Path(out) if out else Path("plans") / f"{_stem(config_path, job)}.plan.yaml"
    check_writable_file(plan_path, "--out" if out else "the plan file")
    outcome = make_plan(job, profile)
    png_path = plan_path.with_suffix(".png")
    save_plan(outcome.plan, plan_path)
    plot_layout(outcome.plan, png_path)
    return PlanResult(job, outcome.plan, plan_path, png_path, outcome.seconds, None,
                      plan_summary(outcome.plan, plan_path, png_path, outcome.seconds))


def find_longest(config_path: Optional[str], overrides: Sequence[str], profile_name: Optional[str]) -> LongestResult:
    """`longtrain.longest_sequence` (`longtrain plan --max-seq`)."""
    from planner.longest import longest_line, longest_sequence

    job, profile = _job_and_profile(config_path, overrides, profile_name)
    longest = longest_sequence(job, profile)
    return LongestResult(longest.seq_len, longest.binding, longest_line(job, profile, longest))


def _job_and_profile(config_path: Optional[str], overrides: Sequence[str], profile_name: Optional[str]):
    job = load_job_config(config_path, list(overrides))
    if job.data.packs_documents:  # the cost model reads the document lengths of the prepared data
        from launch.prepare_command import ensure_prepared

        ensure_prepared(job)
    return job, load_profile(_profile_name(job, profile_name))


def _profile_name(job: JobConfig, flag: Optional[str]) -> str:
    name = flag or (job.metrics.hardware_profile if job.metrics.hardware_profile != "auto" else None)
    if name is None:
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError("metrics.hardware_profile is auto, which a plan cannot use (plans are made before the "
                          f"GPUs exist); pass --profile NAME or set metrics.hardware_profile (known: {known})")
    return name


def _stem(config_path: Optional[str], job: JobConfig) -> str:
    return Path(config_path).stem if config_path else job.run.name

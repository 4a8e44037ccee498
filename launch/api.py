"""longtrain's Python API: what the `longtrain` commands do, as functions that return typed results.

`import longtrain` re-exports these (`longtrain.plan(...)`, `longtrain.train(...)`); the CLI calls the same
functions and prints their results, so a notebook or another launcher gets exactly what the command does. Each
takes a config (a YAML path or a shipped config's name; None: the embedded default job) and `key=value` overrides,
as the command line does. A mistake in the input raises `spec.errors.LongtrainError` (the CLI's one-line errors);
a plan that cannot fit raises `planner.planning.PlanInfeasible`, a LongtrainError naming the smallest change that
fits.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from spec.config import JobConfig, load_job_config

Overrides = Sequence[str]


def load_config(config: Optional[str] = None, overrides: Overrides = ()) -> JobConfig:
    """The resolved job (schema defaults <- the YAML <- overrides), validated: what `longtrain config show` prints."""
    return load_job_config(config, list(overrides))


@dataclass(frozen=True)
class PlanResult:
    """A memory plan (`longtrain plan`). `plan` is None for train.activation_checkpointing=alst, where DeepSpeed
    decides what is kept and the planner only predicts (`alst`)."""

    job: JobConfig
    plan: Optional[Any]
    """spec.plan.Plan: per-layer decisions, the memory layout and `predicted` (peak, budget, step time, MFU)."""
    plan_path: Optional[Path]
    png_path: Optional[Path]
    seconds: float
    alst: Optional[Any]
    """planner.alst.AlstPrediction for an ALST job."""
    summary: str
    """What `longtrain plan` prints."""


def plan(config: Optional[str] = None, overrides: Overrides = (), *, profile: Optional[str] = None,
         out: Optional[str] = None) -> PlanResult:
    """Plan the job on a hardware profile (a name in profiles/hardware/ or a YAML path; default
    metrics.hardware_profile) and write the plan file (default plans/CONFIG_NAME.plan.yaml) and its PNG."""
    from launch.plan_command import make_plan_files

    return make_plan_files(config, overrides, profile, out)


@dataclass(frozen=True)
class LongestResult:
    """The longest data.seq_len that plans (`longtrain plan --max-seq`)."""

    seq_len: int
    """0 when nothing fits."""
    binding: str
    """What stops one more block of tokens, in words."""
    summary: str


def longest_sequence(config: Optional[str] = None, overrides: Overrides = (), *,
                     profile: Optional[str] = None) -> LongestResult:
    """The longest sequence the job plans at (or, with the ALST recipe, that its prediction fits)."""
    from launch.plan_command import find_longest

    return find_longest(config, overrides, profile)


@dataclass(frozen=True)
class DryRunResult:
    """What a start would do (`longtrain train --dry-run`), after every check a start makes; nothing started."""

    job: JobConfig
    run_dir: Path
    continuing: bool
    """The run directory exists and this start resumes it in place."""
    universal: bool
    """The checkpoint to resume is converted to a universal one (another data-parallel size)."""
    placement: str
    deepspeed_config: Dict[str, Any]
    """The DeepSpeed config each worker gets."""
    summary: str


def dry_run(config: Optional[str] = None, overrides: Overrides = ()) -> DryRunResult:
    """Resolve the job and run every check a start makes (data, profile, plan, checkpoint to resume, the workers'
    fit); creates nothing, starts no Ray."""
    from launch.dry_run import check_start

    return check_start(config, overrides)


@dataclass(frozen=True)
class TrainResult:
    """How a training run ended (`longtrain train`)."""

    exit_code: int
    """0 finished (or nothing to do), 1 failed or stopped on a non-finite step, 130 interrupted, 143 SIGTERM."""
    run_dir: Path
    summary: Optional[Any]
    """launch.aggregate.RunSummary (loss first -> last, throughput, per-node MFU); None when no step was logged."""
    resume_command: str
    """The command that continues this run."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def train(config: Optional[str] = None, overrides: Overrides = ()) -> TrainResult:
    """Train the job: local Ray (or cluster.address), one worker per device, progress and the summary on stdout.
    Ctrl-C and SIGTERM end the calling process once the summary is printed (Ray Train's thread cannot be stopped
    otherwise), as `longtrain train` does."""
    from launch.train_command import run_training

    return run_training(config, overrides)

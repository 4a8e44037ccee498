"""`longtrain train`: load the job, place the run directory, start the workers, show progress and a summary."""

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from launch.preflight import check_job
from launch.rundir import place_run
from orchestrator.checkpoint import prepare_resume
from orchestrator.ds_config import uses_cuda
from spec.config import JobConfig, job_to_yaml, load_job_config
from spec.flops import parameter_count


def run_training(config_path: Optional[str], overrides: Sequence[str]) -> int:
    job = with_absolute_paths(load_job_config(config_path, overrides))
    check_job(job)
    placement = prepare_resume(job, place_run(job))
    run_dir = placement.run_dir
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(job, run_dir)
    resume = resume_command(config_path, overrides, run_dir)

    import ray  # heavy: imported after the config is known to be valid

    from launch.console import RunConsole
    from launch.ray_train import connect, run_workers

    started = time.time()
    try:
        connect(job.cluster, run_dir / "logs")
    except Exception:
        if created:  # nothing ran: leave no empty run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print(_header(job, run_dir, uses_cuda(job.cluster)), flush=True)
    console = RunConsole(run_dir, job.train.max_steps, job.metrics.warmup_steps)
    try:
        run_workers(job, run_dir, placement.initial, console.handle)
    except KeyboardInterrupt:
        return _stopped(console, run_dir, resume, "interrupted", EXIT_INTERRUPTED)
    except Exception as error:  # Ray wraps the worker's exception; the user needs the gist and the way out
        return _stopped(console, run_dir, resume,
                        f"training failed: {_first_line(error)}\n  worker logs: {run_dir / 'logs'}", EXIT_RUN_FAILED)
    finally:
        ray.shutdown()
    summary = console.finish(_resume_hint(run_dir, resume))
    if summary is None:
        print(f"nothing to do: {run_dir} is already at train.max_steps={job.train.max_steps}; raise "
              "train.max_steps to train further")
    print(f"  wall time       {time.time() - started:.0f} s")
    return 0


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """Relative file paths in the job made absolute against the directory `longtrain train` runs in: Ray Train
    starts its workers in the run's storage directory, where a relative plan.path (or data.path, ...) is not."""
    def absolute(value: Optional[str]) -> Optional[str]:
        if not value:
            return value
        if Path(value).exists():
            return str(Path(value).resolve())
        head, sep, tag = value.rpartition(":")  # model.init_from may be a DeepSpeed DIR:TAG
        if sep and head and Path(head).is_dir():
            return f"{Path(head).resolve()}:{tag}"
        return value

    job.plan.path = absolute(job.plan.path)
    job.data.path = absolute(job.data.path)
    job.token_elim.predictors = absolute(job.token_elim.predictors)
    job.model.init_from = absolute(job.model.init_from)
    return job


EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130


def resume_command(config_path: Optional[str], overrides: Sequence[str], run_dir: Path) -> str:
    """The command that continues this run (printed when it stops)."""
    kept = [o for o in overrides if not o.startswith("resume=")]
    parts = ["longtrain", "train"] + ([config_path] if config_path else []) + kept + [f"resume={run_dir}"]
    return " ".join(shlex.quote(p) for p in parts)


def _stopped(console, run_dir: Path, resume: str, why: str, code: int) -> int:
    hint = _resume_hint(run_dir, resume)
    console.finish(hint)
    print(f"longtrain: {why}\n  {hint}", file=sys.stderr)
    return code


def _resume_hint(run_dir: Path, resume: str) -> str:
    from orchestrator.checkpoint import latest_complete_tag

    if latest_complete_tag(run_dir / "checkpoints"):
        return f"resume with     {resume}"
    return "no checkpoint was written yet: run the same command again (without resume=)"


def _header(job: JobConfig, run_dir: Path, gpu: bool) -> str:
    device = "GPU, nccl" if gpu else "CPU, gloo"
    params = parameter_count(job.model) / 1e6
    sp = job.parallel.sp_degree
    split = f" in groups of {sp} per sequence (Ulysses, {job.data.seq_len // sp} tokens each)" if sp > 1 else ""
    memory = (f", plan {job.plan.path}" if job.plan.path else
              f", activation checkpointing {job.train.activation_checkpointing}"
              if job.train.activation_checkpointing != "none" else "")
    return (f"longtrain: {job.run.name}: model {job.model.preset} ({params:,.2f}M params, {job.model.num_layers} "
            f"layers), seq_len {job.data.seq_len}, {job.cluster.num_workers} workers{split} ({device}, Ray "
            f"{job.cluster.address}), DeepSpeed ZeRO-{job.train.zero_stage}{memory}, {job.train.max_steps} steps\n"
            f"  run directory: {run_dir}")


def _write_config(job: JobConfig, run_dir: Path) -> None:
    target = run_dir / "config.yaml"
    if target.exists():
        target = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    target.write_text(job_to_yaml(job))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    cause = error.__cause__ or error.__context__
    if not text and cause is not None:
        return _first_line(cause)
    return text.splitlines()[-1] if text else type(error).__name__

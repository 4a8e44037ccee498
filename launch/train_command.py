"""`longtrain train`: load the job, place the run directory, start the workers, show progress and a summary.

However the run ends (finished, a worker failure, a non-finite step, a full disk, Ctrl-C), the driver's last word
on stderr is one line: what happened and the command that resumes. A local run's processes never outlive the
driver (`launch.guard`), not even a SIGKILLed one.
"""

import os
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from launch.api import TrainResult
from launch.guard import start_guard
from launch.interrupts import StopRequested, second_interrupt_exits, sigterm_stops
from launch.jobs import SUBMITTED_CONFIG_ENV
from launch.paths import check_writable_dir
from launch.preflight import check_job
from launch.rundir import RunPlacement, place_run
from launch.runlock import hold_run_lock, release_run_lock
from orchestrator.checkpoint import prepare_resume
from orchestrator.ds_config import uses_cuda
from spec.config import JobConfig, job_to_yaml, load_job_config
from spec.errors import ConfigError
from spec.flops import parameter_count


def run_training(config_path: Optional[str], overrides: Sequence[str]) -> TrainResult:
    """`longtrain.train`: the run, start to summary; how it ended."""
    job = with_absolute_paths(load_job_config(config_path, list(overrides)))
    check_job(job)
    placement = place_run(job)
    check_writable_dir(placement.run_dir, "run.dir" if job.run.dir else "run.root")
    placement = prepare_resume(job, placement)
    run_dir = placement.run_dir
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_run_lock(run_dir)  # before anything is written there
    try:
        return _train_holding_the_lock(job, placement, config_path, overrides, created)
    finally:  # when the run ends, not when the process does: `longtrain.train` returns into a notebook or a
        release_run_lock(run_dir)  # launcher that goes on, and may resume the same run


def _train_holding_the_lock(job: JobConfig, placement: RunPlacement, config_path: Optional[str],
                            overrides: Sequence[str], created: bool) -> TrainResult:
    run_dir = placement.run_dir
    if placement.continuing:
        _say_schedule_change(job, run_dir)
    _write_config(job, run_dir, config_path, overrides)
    resume = resume_command(config_as_named(config_path), overrides, run_dir)

    from launch.console import RunConsole  # heavy: imported after the config is known to be valid
    from launch.ray_train import disconnect

    started = time.time()
    with second_interrupt_exits(lambda: _resume_hint(run_dir, resume), EXIT_INTERRUPTED):
        finished = False
        try:
            _connect(job, run_dir, created)
            print(_header(job, run_dir, uses_cuda(job.cluster)), flush=True)
            console = RunConsole(run_dir, job.train.max_steps, job.metrics.warmup_steps,
                                 trackers=_open_trackers(job, run_dir))
            code = _run_workers(job, run_dir, placement.initial, console, resume)
            finished = code is None
        finally:  # a run that stopped early or failed keeps its Ray session logs beside its own
            disconnect(None if finished else run_dir / "logs" / "ray")
    if code is not None:
        return TrainResult(code, run_dir, _summary_so_far(console), resume)
    summary = console.finish(_resume_hint(run_dir, resume))
    if summary is None:
        print(f"nothing to do: {run_dir} is already at train.max_steps={job.train.max_steps}; raise "
              "train.max_steps to train further")
    print(f"  wall time       {time.time() - started:.0f} s")
    return TrainResult(0, run_dir, summary, resume)


def _summary_so_far(console):
    """The summary of the steps logged before the run stopped early (None: none was)."""
    from launch.aggregate import summarize

    return summarize(console.steps, console.warmup_steps) if console.steps else None


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
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


def resume_command(config_path: Optional[str], overrides: Sequence[str], run_dir: Path) -> str:
    """The command that continues this run (printed when it stops): without `train.stop_at_step`, which the run
    has reached (pasted, it would only say the run is already there)."""
    kept = [o for o in overrides if not o.startswith(("resume=", "train.stop_at_step="))]
    parts = ["longtrain", "train"] + ([config_path] if config_path else []) + kept + [f"resume={run_dir}"]
    return " ".join(shlex.quote(p) for p in parts)


def config_as_named(config_path: Optional[str]) -> Optional[str]:
    """The config as the resume command names it: in a submitted job, as `submit` was given it (the job's own copy
    has only its bare name, which is no file where the user pastes the command); else as `train` was given it."""
    return (os.environ.get(SUBMITTED_CONFIG_ENV) or config_path) if config_path else None


def _open_trackers(job: JobConfig, run_dir: Path):
    """metrics.trackers opened for this run (those not installed skipped with one note each)."""
    from dataclasses import asdict

    from launch.tracking import Trackers, print_notes

    trackers = Trackers(job.metrics.trackers, run_dir, job.run.name, asdict(job))
    print_notes(trackers)
    return trackers


def _connect(job: JobConfig, run_dir: Path, created: bool) -> None:
    """Start or join Ray (a local one watched by the guard); a run directory this run created is removed again
    when Ray does not start (nothing ran)."""
    from launch.ray_train import connect

    (run_dir / "logs").mkdir(exist_ok=True)
    if job.cluster.address == "local":
        start_guard(run_dir / "logs" / "guard.log")
    try:
        connect(job.cluster, run_dir / "logs")
    except BaseException as error:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(error, ConnectionError):
            raise ConfigError(f"cluster.address ({job.cluster.address}): {_first_line(error)}; start the cluster or "
                              "use cluster.address=local") from error
        raise


def _run_workers(job: JobConfig, run_dir: Path, initial, console, resume: str) -> Optional[int]:
    """Train; the exit code when the run stopped early (None: it finished)."""
    from launch.eval_during_training import with_eval
    from launch.ray_train import run_workers

    try:
        with sigterm_stops():
            run_workers(job, run_dir, initial, with_eval(job, run_dir, console.handle, console))
    except StopRequested:
        _leave_now(_stopped(console, run_dir, resume, "stopped by SIGTERM (longtrain stop, ray job stop or kill)",
                            EXIT_TERMINATED))
    except KeyboardInterrupt:
        _leave_now(_stopped(console, run_dir, resume, "interrupted", EXIT_INTERRUPTED))
    except OSError as error:  # the driver's own writes (metrics.jsonl) on a full or read-only disk
        _leave_now(_stopped(console, run_dir, resume, f"cannot write {error.filename}: {error.strerror}; free space",
                            EXIT_RUN_FAILED))
    except Exception as error:  # Ray wraps the worker's exception; the user needs the gist and the way out
        gist = _first_line(error)
        return _stopped(console, run_dir, resume, f"training failed: {gist}{_no_plan_hint(job, gist)} (worker logs: "
                                                  f"{run_dir / 'logs'})", EXIT_RUN_FAILED)
    if console.stopped_by:
        stop = console.stopped_by
        return _stopped(console, run_dir, resume, f"stopped at step {stop['step']}: {stop['why']} "
                                                  "(train.on_nonfinite=stop; that step was not checkpointed); change "
                                                  "what diverged (e.g. lower optim.lr)", EXIT_RUN_FAILED)
    return None


def _leave_now(code: int) -> NoReturn:
    """End the driver at once, its last line printed. The run stopped while Ray Train's fit() still runs in its
    thread, and once `ray.shutdown` has run, that thread's next call into Ray ends the process with exit code 1
    (core_worker_process.cc: "The core worker has already been shutdown ... The process will exit"). The guard ends
    a local Ray's processes; a cluster ends the job's actors when their owner, this driver, is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stopped(console, run_dir: Path, resume: str, why: str, code: int) -> int:
    """The summary so far on stdout, and one line on stderr: why the run stopped and how to resume."""
    hint = _resume_hint(run_dir, resume)
    try:
        console.finish(hint, _latest_checkpoint(run_dir))
    except OSError:  # the summary is a courtesy; the line below is what must reach the user
        pass
    print(f"longtrain: {why}; {re.sub(r'^resume with +', 'resume with: ', hint)}", file=sys.stderr, flush=True)
    return code


def _resume_hint(run_dir: Path, resume: str) -> str:
    if _latest_checkpoint(run_dir):
        return f"resume with     {resume}"
    return "no checkpoint was written yet: run the same command again (without resume=)"


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    from orchestrator.checkpoint import latest_complete_tag

    with warnings.catch_warnings():  # a tag cut short by the stop is expected here, not news
        warnings.simplefilter("ignore")
        latest = latest_complete_tag(run_dir / "checkpoints")
    return run_dir / "checkpoints" / latest if latest else None


def _header(job: JobConfig, run_dir: Path, gpu: bool) -> str:
    device = "GPU, nccl" if gpu else "CPU, gloo"
    params = parameter_count(job.model) / 1e6
    sp = job.parallel.sp_degree
    split = f" in groups of {sp} per sequence (Ulysses, {job.data.seq_len // sp} tokens each)" if sp > 1 else ""
    memory = (f", plan {job.plan.path}" if job.plan.path else
              f", activation checkpointing {job.train.activation_checkpointing}"
              if job.train.activation_checkpointing != "none" else "")
    return (f"longtrain: {job.run.name}: model {_model_label(job.model)} ({params:,.2f}M params, "
            f"{job.model.num_layers} layers{_rope_label(job.model)}), seq_len {job.data.seq_len}, "
            f"{job.cluster.num_workers} workers{split} ({device}, Ray "
            f"{job.cluster.address}), DeepSpeed ZeRO-{job.train.zero_stage}{memory}, {job.train.max_steps} steps\n"
            f"{_extension_line(job.model)}  run directory: {run_dir}")


def _model_label(model) -> str:
    """The preset, or the Hugging Face class and directory the shape came from (model.init_from's config.json)."""
    from spec.config.hf import ARCHITECTURES, HF_PRESET

    return f"{ARCHITECTURES[model.architecture]} from {model.init_from}" if model.preset == HF_PRESET else model.preset


def _rope_label(model) -> str:
    from spec.config.hf import rope_scaling_text

    scaling = "" if model.rope_scaling.type == "none" else f", {rope_scaling_text(model.rope_scaling)}"
    return f", RoPE theta {model.rope_theta:g}{scaling}"


def _extension_line(model) -> str:
    """'  context extension: rope_theta 500000 -> 8e+06 (config.json: ...)' when the job changes the source's RoPE."""
    from spec.config.hf import extension

    change = extension(model, model.init_from)
    return f"  context extension: {change} (from {model.init_from}/config.json)\n" if change else ""


def _write_config(job: JobConfig, run_dir: Path, config_path: Optional[str], overrides: Sequence[str]) -> None:
    """config.yaml, and config.STAMP.yaml for each resume; each headed by the command that wrote it (its
    overrides), a YAML comment that readers of the resolved config skip."""
    target = run_dir / "config.yaml"
    if target.exists():
        target = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    command = " ".join(shlex.quote(p) for p in ["longtrain", "train"] + ([config_path] if config_path else [])
                       + list(overrides))
    target.write_text(f"# written by: {command}\n" + job_to_yaml(job))


def _say_schedule_change(job: JobConfig, run_dir: Path) -> None:
    """Keep, refuse or re-shape the learning-rate schedule of this resume (launch.reschedule), in one line."""
    from launch.reschedule import settle_schedule

    note = settle_schedule(job, run_dir)
    if note:
        print(f"longtrain: {note}", flush=True)


def _no_plan_hint(job: JobConfig, gist: str) -> str:
    """Out of device memory (the failure's `_first_line`) without a memory plan: everything was kept, and
    `longtrain plan` is the way out."""
    if job.plan.path or "out of memory" not in gist.lower():
        return ""
    return ("; this job has no memory plan (plan.path), so every activation was kept: make one with `longtrain plan "
            "CONFIG --out plan.yaml` and train with plan.path=plan.yaml")


def _first_line(error: BaseException) -> str:
    """The gist of an error that may wrap a worker's traceback: the last `Type: message` line (our own error types'
    names dropped), else the last line. Ray Train cuts the middle out of long worker errors (a CUDA out-of-memory
    message lost its first half), so a worker's own exception is read where Ray keeps it (`worker_failures`)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"rank {rank}: {_first_line(failures[rank])}"
    text = str(error).strip()
    cause = error.__cause__ or error.__context__
    if not text and cause is not None:
        return _first_line(cause)
    lines = text.splitlines() or [type(error).__name__]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return re.sub(r"^spec\.errors\.\w+: ", "", raised[-1] if raised else lines[-1])

"""Experiment tracking (issue 23): TensorBoard event files read back with tensorboard's own reader, lr and grad
norm in the step line and metrics.jsonl, the holdout loss every metrics.eval_every_steps, a resume command that
leaves train.stop_at_step behind, and the learning-rate schedule of a resume. One real run through the Python API
(1 Ray worker, DeepSpeed, a tiny model; about a minute)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import longtrain
from launch.aggregate import node_rows
from launch.console import RunConsole, step_line
from launch.tracking import Trackers
from launch.train_command import resume_command
from spec.config import load_job_config
from spec.errors import ConfigError

SMALL = ["model.num_layers=1", "data.seq_len=64", "data.micro_batch_size=2", "optim.warmup_steps=1",
         "cluster.num_workers=1", "train.log_every_steps=2", "checkpoint.every_steps=0"]


def _row(rank: int, step: int, grad_norm=1.5) -> dict:
    return {"step": step, "rank": rank, "node": "node0/vm", "loss": 2.0 + rank, "lr": 3e-4, "step_seconds": 0.5,
            "tokens": 100, "tokens_per_second": 200.0, "tflops": 0.01, "mfu": 0.4, "mfu_full_attention": 0.5,
            "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0, "host_rss_gib": 1.0, "swap_host_gib": 0.0,
            "grad_norm": grad_norm, "attention": "sequence"}


def _scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("key, label, fallback_to", [("arena", "arena", "the allocator"),
                                                    ("replay", "replayed", "the cache")])
def test_step_line_reports_planned_memory_and_its_fallbacks(key, label, fallback_to):
    """The plan's static arena, and the traced step's layout under train.allocator=planned."""
    rows = [_row(0, 10), _row(1, 10)]
    assert label not in step_line(10, 2.5, rows, node_rows(rows))  # none in this run (or not yet): nothing to say
    for row in rows:
        row.update({f"{key}_gib": 12.9, f"{key}_fallbacks": 0, f"{key}_fallback_gib": 0.0})
    assert step_line(10, 2.5, rows, node_rows(rows)).endswith(f"| {label} 12.90 GiB, 0 fallbacks")
    rows[1].update({f"{key}_fallbacks": 2, f"{key}_fallback_gib": 1.5})
    assert step_line(10, 2.5, rows, node_rows(rows)).endswith(
        f"| {label} 12.90 GiB, 2 fallbacks (1.50 GiB to {fallback_to})")


def test_step_line_carries_lr_and_grad_norm():
    rows = [_row(0, 10), _row(1, 10)]
    line = step_line(10, 2.5, rows, node_rows(rows))
    assert "| lr 3.00e-04 | grad norm   1.500 |" in line
    assert "grad norm" not in step_line(10, 2.5, [_row(0, 10, None)], node_rows([_row(0, 10, None)]))


def test_console_writes_steps_and_eval_to_tensorboard_and_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    console = RunConsole(tmp_path, 4, 0, trackers=Trackers(["tensorboard"], tmp_path, "t"))
    for step in (2, 4):
        console.handle({"kind": "step", "step": step, "rows": [_row(0, step), _row(1, step)]})
    console.handle({"kind": "eval", "step": 4, "loss": 1.25, "batches": 2})
    console.finish("resume with     x")
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(2, 2.5), (4, 2.5)]
    assert scalars["train/grad_norm"][-1] == (4, 1.5) and scalars["eval/loss"] == [(4, 1.25)]
    for tag in ("train/lr", "perf/mfu", "perf/mfu_full_attention", "perf/tokens_per_second_per_worker",
                "memory/host_rss_gib", "node/node0/vm/mfu"):
        assert tag in scalars, tag
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step", "step", "eval"] and records[0]["rows"][0]["grad_norm"] == 1.5


def test_a_tracker_not_installed_is_skipped_with_one_note(tmp_path):
    missing = [name for name in ("wandb", "mlflow") if not importlib.util.find_spec(name)]
    if not missing:
        pytest.skip("wandb and mlflow are both installed here")
    trackers = Trackers(missing, tmp_path, "t")
    assert trackers.writers == [] and len(trackers.notes) == len(missing)
    assert all("not installed (pip install" in note for note in trackers.notes)


def test_trackers_and_eval_keys_are_checked():
    assert load_job_config(None, ["metrics.trackers=[]"]).metrics.trackers == []
    with pytest.raises(ConfigError, match="metrics.trackers: unknown tensorbord; choose from tensorboard"):
        load_job_config(None, ["metrics.trackers=[tensorbord]"])
    with pytest.raises(ConfigError, match="metrics.eval_every_steps"):
        load_job_config(None, ["metrics.eval_every_steps=-1"])


def test_resume_command_leaves_stop_at_step_behind(tmp_path):
    command = resume_command("configs/default.yaml", ["train.stop_at_step=5", "train.max_steps=9", "resume=auto"],
                             tmp_path)
    assert command == f"longtrain train configs/default.yaml train.max_steps=9 resume={tmp_path}"


@pytest.mark.slow
def test_a_real_run_logs_lr_grad_norm_and_holdout_loss_and_its_resume_command_works(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.max_steps=6", "train.stop_at_step=4", "metrics.eval_every_steps=2",
            f"run.dir={run_dir}"]
    monkeypatch.chdir(tmp_path)
    result = longtrain.train(None, args)  # the Python API: what `longtrain train` runs
    first = capsys.readouterr()
    assert result.exit_code == 0 and result.run_dir == run_dir, first.out[-3000:] + first.err[-3000:]
    assert result.summary.last_step == 4 and "stop_at_step" not in result.resume_command
    assert "| lr " in first.out and "grad norm" in first.out and "holdout loss" in first.out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["loss"] > 0 for e in evals)
    steps = [r for r in records if r["kind"] == "step"]
    norms, lrs = [r["rows"][0]["grad_norm"] for r in steps], [r["rows"][0]["lr"] for r in steps]
    assert all(n is not None and n > 0 for n in norms) and max(lrs) > 0, (norms, lrs)  # warm-up starts at lr 0
    scalars = _scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4] and scalars["train/grad_norm"]
    resume = next(line for line in first.out.splitlines() if "resume with" in line).split("resume with", 1)[1]
    assert resume.strip() == result.resume_command
    _resume_with_other_schedules_is_kept_refused_or_reshaped(args, run_dir)
    pasted = resume.split()[2:]  # longtrain train ...
    second = subprocess.run([sys.executable, "-m", "launch.cli", "train", *pasted], cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "step      6 | loss" in second.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "resumed"] == [("resumed", 4)]  # a restart record


def _resume_with_other_schedules_is_kept_refused_or_reshaped(args, run_dir):
    """The run stopped at step 4 of 6, resumed (dry runs: every check a start makes) with train.max_steps=8."""
    kept = [a for a in args if not a.startswith("train.")] + ["train.max_steps=8", f"resume={run_dir}"]
    checked = longtrain.dry_run(None, kept)
    assert checked.continuing and checked.deepspeed_config["scheduler"]["params"]["total_num_steps"] == 6
    assert "schedule        train.max_steps 6 -> 8: the learning-rate schedule is kept" in checked.summary
    stretched = longtrain.dry_run(None, kept + ["train.reschedule=true"])
    assert stretched.deepspeed_config["scheduler"]["params"]["total_num_steps"] == 8
    with pytest.raises(ConfigError, match=r"^optim.lr 0.003 -> 0.01, train.max_steps 6 -> 8 on a resume at step 4"):
        longtrain.dry_run(None, kept + ["optim.lr=0.01"])


def test_a_resume_that_changes_max_steps_keeps_the_schedule_unless_told_to_reshape_it():
    """The default job (400 steps, cosine to 0.1 x 3e-3) resumed at step 400 with train.max_steps=600."""
    from dataclasses import asdict

    from launch.reschedule import lr_at, schedule_decision

    before = load_job_config(None, [])
    kept = load_job_config(None, ["train.max_steps=600"])
    note = schedule_decision(kept, asdict(before), 400)
    assert kept.optim.schedule_steps == 400 and lr_at(kept, 400) == lr_at(kept, 600) == pytest.approx(3e-4)
    assert note.startswith("note: train.max_steps 400 -> 600: the learning-rate schedule is kept (cosine over 400 "
                           "steps; lr after step 400 0.0003); train.reschedule=true would stretch it over 600 steps")
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"`{note}`" in readme  # the README quotes this very line
    stretched = load_job_config(None, ["train.max_steps=600", "train.reschedule=true"])
    note = schedule_decision(stretched, asdict(before), 400)
    assert stretched.optim.schedule_steps is None and lr_at(stretched, 400) > 3 * lr_at(before, 400)
    assert note.endswith(f"schedule 400 -> 600 steps re-shapes the learning-rate schedule from step 400 (lr after "
                         f"step 400 0.0003 -> {lr_at(stretched, 400):.3g})")
    with pytest.raises(ConfigError, match=r"^optim.lr 0.003 -> 0.001 on a resume at step 400 re-shapes .* pass "
                                          r"train.reschedule=true"):
        schedule_decision(load_job_config(None, ["optim.lr=1e-3"]), asdict(before), 400)
    again = load_job_config(None, ["train.max_steps=600"])  # the next resume of the kept run: kept again, quietly
    assert schedule_decision(again, asdict(kept), 500) is None and again.optim.schedule_steps == 400
    assert schedule_decision(before, asdict(before), 400) is None
    assert schedule_decision(load_job_config(None, ["train.log_every_steps=1"]), asdict(before), 400) is None


def test_each_written_config_names_the_command_that_wrote_it(tmp_path):
    import yaml

    from launch.config_command import run_config
    from launch.train_command import _write_config

    job = load_job_config(None, ["train.max_steps=70"])
    _write_config(job, tmp_path, None, ["train.max_steps=70"])
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# written by: longtrain train train.max_steps=70\n")
    assert yaml.safe_load(text)["train"]["max_steps"] == 70 == run_config(tmp_path)["train"]["max_steps"]


def test_mlflow_gets_the_same_scalars_in_a_store_in_the_run_directory(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from dataclasses import asdict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = Trackers(["mlflow"], tmp_path, "t", asdict(load_job_config(None, [])))
    assert trackers.notes == []
    run_id = trackers.writers[0].run.info.run_id
    console = RunConsole(tmp_path, 4, 0, trackers=trackers)
    for step in (2, 4):
        console.handle({"kind": "step", "step": step, "rows": [_row(0, step), _row(1, step)]})
    console.handle({"kind": "eval", "step": 4, "loss": 1.25, "batches": 2})
    console.finish("resume with     x")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(2, 2.5), (4, 2.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss")] == [(4, 1.25)]
    assert client.get_run(run_id).data.params["train.max_steps"] == "400"


def test_a_tracker_that_cannot_start_is_one_note_and_training_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    trackers = Trackers(["mlflow"], tmp_path, "t")
    assert trackers.writers == [] and trackers.notes[0].startswith("metrics.trackers: mlflow could not start (")


def test_wandb_offline_writes_its_run_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "default-20261201-000000"
    run_dir.mkdir()
    trackers = Trackers(["wandb"], run_dir, "default", {"train": {"max_steps": 4}})
    assert trackers.notes == []
    console = RunConsole(run_dir, 4, 0, trackers=trackers)
    for step in (2, 4):
        console.handle({"kind": "step", "step": step, "rows": [_row(0, step), _row(1, step)]})
    console.finish("resume with     x")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")) and offline.name.endswith(run_dir.name)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # pytest's report of a thread's traceback
def test_a_full_disk_under_tensorboard_is_raised_once_without_a_thread_traceback(tmp_path, capfd):
    """TensorBoard's writer thread dies with the disk-full error: the run's driver gets that OSError (to stop with
    its one line) and nothing else reaches the terminal; a full disk is not a tracker to drop and go on without."""
    import errno
    import threading

    from tests.conftest import mount_tmpfs

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "256k")
    try:
        trackers = Trackers(["tensorboard"], disk, "run")
        (disk / "ballast").write_bytes(b"\0" * (256 * 1024 - 16 * 1024))
        with pytest.raises(OSError) as raised:
            for step in range(10_000):
                trackers.log({f"train/x{i}": float(i) for i in range(20)}, step)
        assert raised.value.errno == errno.ENOSPC and trackers.writers
        for thread in threading.enumerate():
            if type(thread).__name__ == "_AsyncWriterThread":
                thread.join(10)
        trackers.close()
        assert capfd.readouterr().err == ""
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)

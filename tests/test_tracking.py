"""Experiment tracking (issue 23): TensorBoard event files read back with tensorboard's own reader, lr and grad
norm in the step line and metrics.jsonl, the holdout loss every metrics.eval_every_steps, and a resume command
that leaves train.stop_at_step behind. One real run (1 Ray worker, DeepSpeed, a tiny model; about a minute)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
def test_a_real_run_logs_lr_grad_norm_and_holdout_loss_and_its_resume_command_works(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.max_steps=6", "train.stop_at_step=4", "metrics.eval_every_steps=2",
            f"run.dir={run_dir}"]
    first = subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "| lr " in first.stdout and "grad norm" in first.stdout and "holdout loss" in first.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["loss"] > 0 for e in evals)
    steps = [r for r in records if r["kind"] == "step"]
    norms, lrs = [r["rows"][0]["grad_norm"] for r in steps], [r["rows"][0]["lr"] for r in steps]
    assert all(n is not None and n > 0 for n in norms) and max(lrs) > 0, (norms, lrs)  # warm-up starts at lr 0
    scalars = _scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4] and scalars["train/grad_norm"]
    resume = next(line for line in first.stdout.splitlines() if "resume with" in line).split("resume with", 1)[1]
    assert "stop_at_step" not in resume
    pasted = resume.split()[2:]  # longtrain train ...
    second = subprocess.run([sys.executable, "-m", "launch.cli", "train", *pasted], cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "step      6 | loss" in second.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "resumed"] == [("resumed", 4)]  # a restart record


def test_a_resume_that_changes_max_steps_says_how_the_lr_schedule_changes():
    from dataclasses import asdict

    from launch.reschedule import lr_at, schedule_note

    before = load_job_config(None, [])  # the default job: 400 steps, cosine to 0.1 x 3e-3
    after = load_job_config(None, ["train.max_steps=600"])
    assert lr_at(before, 400) == pytest.approx(3e-4)
    assert lr_at(after, 400) > 3 * lr_at(before, 400)  # the cosine is re-shaped, not kept
    note = schedule_note(after, asdict(before), 400)
    assert note.startswith("note: train.max_steps 400 -> 600 re-shapes the learning-rate schedule")
    assert note.endswith(f"lr after step 400 0.0003 -> {lr_at(after, 400):.3g}")
    assert schedule_note(before, asdict(before), 400) is None
    assert schedule_note(load_job_config(None, ["train.max_steps=600", "train.log_every_steps=1"]),
                         asdict(after), 400) is None  # a key that does not shape the schedule


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

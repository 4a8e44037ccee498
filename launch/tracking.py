"""Experiment trackers the driver writes each logged step to: TensorBoard, W&B, MLflow (`metrics.trackers`).

Why on the driver and through the libraries' own writers: the driver already receives every rank's reading
(the rows of metrics.jsonl), so one writer sees the whole run without workers needing the tracker's package,
and files written by `SummaryWriter`, `wandb` and `mlflow` open in the tools people already use. A tracker
whose package is not installed is skipped with one note; training never fails for want of a tracker.
"""

import errno
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TENSORBOARD_DIR = "tensorboard"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def step_scalars(message: Dict, nodes: Sequence) -> Dict[str, float]:
    """The scalars of one logged step: loss, lr and grad norm (rank 0's: every rank holds the same), throughput,
    both MFUs, memory (the worst rank), and each node's row under `node/NAME/`."""
    rows = message["rows"]
    first = rows[0]
    scalars = {
        "train/loss": sum(r["loss"] for r in rows) / len(rows),
        "train/lr": first["lr"],
        "perf/tokens_per_second_per_worker": sum(r["tokens_per_second"] for r in rows) / len(rows),
        "perf/step_seconds_slowest": max(r["step_seconds"] for r in rows),
        "perf/mfu": sum(r["mfu"] for r in rows) / len(rows),
        "perf/mfu_full_attention": sum(r["mfu_full_attention"] for r in rows) / len(rows),
        "memory/peak_allocated_gib": max(r["peak_allocated_gib"] for r in rows),
        "memory/peak_reserved_gib": max(r["peak_reserved_gib"] for r in rows),
        "memory/host_rss_gib": max(r["host_rss_gib"] for r in rows),
    }
    if first.get("grad_norm") is not None:
        scalars["train/grad_norm"] = first["grad_norm"]
    for node in nodes:
        for key in ("mfu", "mfu_full_attention", "tokens_per_second"):
            scalars[f"node/{node.node}/{key}"] = getattr(node, key)
    return scalars


class Trackers:
    """The trackers asked for that can run here; `notes` says which were skipped and why."""

    def __init__(self, names: Sequence[str], run_dir: Path, run_name: str, config: Optional[Dict] = None):
        self.writers: List = []
        self.notes: List[str] = []
        for name in names:
            module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
            if importlib.util.find_spec(module) is None:
                self.notes.append(f"metrics.trackers: {name} is not installed (pip install {module}); not tracked")
                continue
            try:
                self.writers.append(_OPEN[name](run_dir, run_name, config or {}))
            except Exception as error:  # a tracker's own setup (a server, a login, a store) must not stop training
                self.notes.append(f"metrics.trackers: {name} could not start ({_gist(error)}); not tracked")

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self._each(lambda writer: writer.log(scalars, step))

    def text(self, tag: str, text: str) -> None:
        self._each(lambda writer: writer.text(tag, text))

    def _each(self, call) -> None:
        """Call every writer; one that fails is dropped with one line on stderr (the run and metrics.jsonl go on).
        A full or read-only disk is raised instead: trackers write into the run directory, so metrics.jsonl and
        the next checkpoint cannot be written either, and the driver stops the run with one line saying so."""
        for writer in list(self.writers):
            try:
                call(writer)
            except OSError as error:
                if error.errno in DISK_ERRORS:
                    raise
                self._drop(writer, error)
            except Exception as error:
                self._drop(writer, error)

    def _drop(self, writer, error: Exception) -> None:
        self.writers.remove(writer)
        print(f"longtrain: {type(writer).__name__.strip('_')} tracking stopped ({_gist(error)}); metrics.jsonl "
              "still has every step", file=sys.stderr)

    def close(self) -> None:
        """Close every writer; one that cannot (its disk full) does not keep the run's summary from printing."""
        for writer in self.writers:
            try:
                writer.close()
            except Exception:
                pass
        self.writers = []


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: Dict):
        from torch.utils.tensorboard import SummaryWriter

        _silence_tensorboard_writer_thread()
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, scalars: Dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run killed mid-way keeps what it logged

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, run_name: str, config: Dict):
        import wandb

        self.run = wandb.init(name=run_dir.name, group=run_name, dir=str(run_dir), config=config, resume="allow",
                              id=run_dir.name)

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """MLflow's server when MLFLOW_TRACKING_URI names one, else a SQLite store in the run directory (the backend
    MLflow 3 recommends over ./mlruns: `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`); experiment =
    run.name, run = the run directory's name."""

    def __init__(self, run_dir: Path, run_name: str, config: Dict):
        import os

        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI")
                                or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        mlflow.set_experiment(run_name)
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({f"{section}.{key}": value for section, values in config.items()
                           if isinstance(values, dict) for key, value in values.items()})

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def text(self, tag: str, text: str) -> None:
        self.mlflow.log_text(text, f"{tag}.txt")

    def close(self) -> None:
        self.mlflow.end_run()


def _silence_tensorboard_writer_thread() -> None:
    """TensorBoard writes from a thread of its own that dies with its write error (a full disk), and the next
    flush raises that error again in the caller, where `Trackers._each` reports it. Without this hook the dying
    thread also prints its traceback to the terminal."""
    previous = threading.excepthook
    if getattr(previous, "longtrain", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.longtrain = True
    threading.excepthook = hook


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _gist(error: Exception) -> str:
    return " ".join(str(error).split())[:160] or type(error).__name__


def print_notes(trackers: Trackers, stream=sys.stdout) -> None:
    for note in trackers.notes:
        print(f"longtrain: {note}", file=stream)

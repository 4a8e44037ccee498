"""What the user sees while a job runs: a progress bar, one metrics line per logged step, a final table.

Everything printed here is also in the run directory (metrics.jsonl), so the console can stay terse.
"""

import sys
from pathlib import Path
from typing import Dict, List, Optional

from tqdm import tqdm

from launch.aggregate import RunSummary, mean_loss, node_rows, summarize
from launch.metrics_file import MetricsFile


class RunConsole:
    """Consumes the messages workers publish (tick, step, checkpoint, resumed, nonfinite) and renders them."""

    def __init__(self, run_dir: Path, max_steps: int, warmup_steps: int, stream=None, trackers=None):
        self.run_dir = run_dir
        self.trackers = trackers
        """`launch.tracking.Trackers` each logged step and eval loss also go to (None: metrics.jsonl only)."""
        self.warmup_steps = warmup_steps
        self.stream = stream or sys.stdout  # looked up now: a caller (a notebook, a test) may have replaced it
        self.steps: List[Dict] = []
        self.checkpoints: List[str] = []
        self.bar = tqdm(total=max_steps, desc="train", unit="step", file=self.stream, dynamic_ncols=True,
                        leave=True, disable=not _is_terminal(self.stream),
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        self.metrics_file = MetricsFile(run_dir / "metrics.jsonl")
        self.stopped_by: Optional[Dict] = None
        """The `nonfinite` message that ended the run (train.on_nonfinite=stop)."""

    def handle(self, message: Dict) -> None:
        kind = message["kind"]
        if kind in ("tick", "step"):
            self.bar.update(max(0, message["step"] - self.bar.n))
        if kind == "tick":
            self.bar.set_postfix_str(f"loss {message['loss']:.3f}")
        elif kind == "step":
            self._log_step(message)
        elif kind == "checkpoint":
            self.checkpoints.append(message["path"])
            self.bar.write(f"checkpoint step {message['step']} -> {message['path']}")
        elif kind == "resumed":
            self.metrics_file.append(message)  # a restart record: the steps after it may repeat logged ones
            self.bar.n = message["step"]
            self.bar.write(f"resumed from {message['path']} at step {message['step']}")
        elif kind == "eval":
            self._log_eval(message)
        elif kind == "nonfinite" and message["action"] == "skip":
            self.bar.write(f"step {message['step']}: {message['why']}; update skipped (train.on_nonfinite=skip)")
        elif kind == "nonfinite":
            self.stopped_by = message

    def _log_step(self, message: Dict) -> None:
        self.steps.append(message)
        nodes = node_rows(message["rows"])
        self.metrics_file.append({**message, "nodes": [vars(n) for n in nodes]})
        loss = mean_loss(message)
        self.bar.set_postfix_str(f"loss {loss:.3f}")
        self.bar.write(step_line(message["step"], loss, message["rows"], nodes))
        if self.trackers:
            from launch.tracking import step_scalars

            self.trackers.log(step_scalars(message, nodes), message["step"])

    def _log_eval(self, message: Dict) -> None:
        """The holdout loss (metrics.eval_every_steps): a line, a metrics.jsonl record, a tracker scalar."""
        self.metrics_file.append(message)
        self.bar.write(f"eval   {message['step']:>6} | holdout loss {message['loss']:7.4f} "
                       f"({message['batches']} micro-batches per rank)")
        if self.trackers:
            self.trackers.log({"eval/loss": message["loss"]}, message["step"])

    def finish(self, resume_hint: str, latest_checkpoint: Optional[Path] = None) -> Optional[RunSummary]:
        """Close the bar and metrics.jsonl, print the summary table. `latest_checkpoint`: the run's newest complete
        checkpoint, whose message may not have arrived when the run was stopped."""
        self.bar.close()
        self.metrics_file.close()
        if self.trackers:
            self.trackers.close()
        if latest_checkpoint and str(latest_checkpoint) not in self.checkpoints:
            self.checkpoints.append(str(latest_checkpoint))
        if not self.steps:
            return None
        summary = summarize(self.steps, self.warmup_steps)
        documents = self.steps[-1]["rows"][0].get("attention") == "documents"
        print(summary_table(summary, self.run_dir, self.checkpoints, resume_hint, documents), file=self.stream)
        return summary


def step_line(step: int, loss: float, rows: List[Dict], nodes) -> str:
    worst = max(rows, key=lambda r: r["step_seconds"])
    mfu = ", ".join(f"{n.mfu:.1%}" for n in nodes)
    mem = max(r["peak_allocated_gib"] for r in rows)
    host = max(r["host_rss_gib"] for r in rows)
    swap = max(r["swap_host_gib"] for r in rows)
    tokens = sum(r["tokens_per_second"] for r in rows) / len(rows)
    tflops = sum(r["tflops"] for r in rows) / len(rows)
    return (f"step {step:>6} | loss {loss:7.4f} | {_lr_and_grad_norm(rows[0])}{tokens:9,.0f} tok/s/worker | "
            f"{tflops:7.3f} TFLOP/s/worker | "
            f"MFU/node {mfu} | peak mem {mem:.2f} GiB | host {host:.2f} GiB (swap {swap:.2f}) | "
            f"step {worst['step_seconds']:.3f} s "
            f"(slowest rank {worst['rank']}){_planned_memory(rows)}")


def _planned_memory(rows: List[Dict]) -> str:
    """' | arena 12.90 GiB, 0 fallbacks | replayed 79.90 GiB, 0 fallbacks': the plan's static arena and the traced
    step's layout (train.allocator=planned) where a run has them, each with the requests of this step (all ranks)
    that missed their planned place: the arena's went to the allocator, the layout's to its exact-size cache."""
    return _region(rows, "arena", "arena", "the allocator") + _region(rows, "replay", "replayed", "the cache")


def _region(rows: List[Dict], key: str, label: str, fallback_to: str) -> str:
    size = max(r.get(f"{key}_gib", 0.0) for r in rows)
    if not size:
        return ""
    count = sum(r.get(f"{key}_fallbacks", 0) for r in rows)
    moved = sum(r.get(f"{key}_fallback_gib", 0.0) for r in rows)
    return f" | {label} {size:.2f} GiB, {count} fallbacks" + (f" ({moved:.2f} GiB to {fallback_to})" if count else "")


def _lr_and_grad_norm(row: Dict) -> str:
    """'lr 3.00e-04 | grad norm 1.234 | ' (rank 0's: DeepSpeed gives every rank the same); older readings lack
    the grad norm, and an offloaded optimizer may not report one."""
    norm = row.get("grad_norm")
    return f"lr {row['lr']:.2e} | " + (f"grad norm {norm:7.3f} | " if norm is not None else "")


def summary_table(summary: RunSummary, run_dir: Path, checkpoints: List[str], resume_hint: str,
                  documents: bool = False) -> str:
    """`documents`: the attention FLOPs were summed over packed documents (data.packing=documents)."""
    lines = [
        "",
        "run summary",
        f"  loss            {summary.first_loss:.4f} (step {summary.first_step}) -> {summary.last_loss:.4f} "
        f"(step {summary.last_step})  [{1 - summary.last_loss / summary.first_loss:+.1%} relative drop]",
        f"  throughput      {summary.tokens_per_second_per_worker:,.0f} tokens/s per worker (after warm-up)",
        "  per node        node                    ranks   MFU (causal-halved / full-attn)   tokens/s   "
        "slowest rank   peak alloc / reserved GiB   host RSS GiB",
    ]
    if documents:
        lines.append("                  (MFU: attention FLOPs summed over the packed documents, length^2 each)")
    for n in summary.nodes:
        lines.append(f"                  {n.node:<22} {n.num_ranks:>5}   {n.mfu:>7.2%} / {n.mfu_full_attention:<7.2%}"
                     f"                {n.tokens_per_second:>9,.0f}   {n.slowest_rank:>4} "
                     f"({n.slowest_step_seconds:.3f} s)   {n.peak_allocated_gib:>6.2f} / "
                     f"{n.peak_reserved_gib:<6.2f}           {n.host_rss_gib:.2f}")
    lines += [
        f"  run directory   {run_dir}",
        f"  metrics         {run_dir / 'metrics.jsonl'}",
        f"  checkpoint      {checkpoints[-1] if checkpoints else 'none written'}",
        f"  {resume_hint}",
    ]
    return "\n".join(lines)


def _is_terminal(stream) -> bool:
    """A live bar only on a terminal; logs and CI get the per-step metrics lines alone."""
    return hasattr(stream, "isatty") and stream.isatty()

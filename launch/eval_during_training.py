"""`eval.every_steps`: the long-context evaluation of checkpoints while the run trains, on the driver.

Why on the driver, from the checkpoint files: the workers' engines are sharded (ZeRO-3) and busy; the checkpoint
is the model as it will be resumed or exported, read by the same loader `longtrain eval` uses, so the rows equal
what `longtrain eval RUN_DIR:TAG` reports. The driver evaluates when the checkpoint's message arrives (the workers
keep training meanwhile; the console's progress waits), on its own CPU or GPU: meant for small models or short
lengths; evaluate a large model afterwards with `longtrain eval` on a GPU."""

import time
from pathlib import Path
from typing import Callable, Dict, List

from spec.config import JobConfig

ROW_KIND = "long_context_eval"


def with_eval(job: JobConfig, run_dir: Path, handle: Callable[[Dict], None], console) -> Callable[[Dict], None]:
    """The console's message handler, followed by an evaluation of each checkpoint at a multiple of
    eval.every_steps (a row in metrics.jsonl, the PNGs and results.json in RUN_DIR/eval, one console line)."""
    if job.eval.every_steps <= 0:
        return handle
    history: List = []
    job.eval.length = job.eval.length or job.data.seq_len
    job.eval.lengths = list(job.eval.lengths) or [job.eval.length]

    def handled(message: Dict) -> None:
        handle(message)
        if message.get("kind") == "checkpoint" and message["step"] % job.eval.every_steps == 0:
            record = evaluate_checkpoint(job, run_dir, Path(message["path"]).name, history)
            console.metrics_file.append(record)
            console.bar.write(summary_line(record))

    return handled


def evaluate_checkpoint(job: JobConfig, run_dir: Path, tag: str, history: List) -> Dict:
    import torch

    from orchestrator.eval.models import resolve_model
    from orchestrator.eval.report import write_all
    from orchestrator.eval.run import evaluate

    started = time.time()
    model = resolve_model(f"{run_dir}:{tag}", job)
    device = torch.device("cpu")
    result = evaluate(model, job, device, torch.float32)
    history.append(result)
    write_all(run_dir / "eval", history, {"during_training": True, "every_steps": job.eval.every_steps})
    return {"kind": ROW_KIND, "step": int(tag.rpartition("_")[2]), "tag": tag, "seconds": time.time() - started,
            "buckets": [{"start": b.start, "end": b.end, "loss": b.loss} for b in result.buckets],
            "passkey": [{"length": c.length, "depth": c.depth, "accuracy": c.accuracy,
                         "token_accuracy": c.token_accuracy} for c in result.cells]}


def summary_line(record: Dict) -> str:
    buckets, cells = record["buckets"], record["passkey"]
    accuracy = sum(c["accuracy"] for c in cells) / len(cells)
    return (f"eval   {record['step']:>6} | loss {buckets[0]['loss']:.3f} at positions {buckets[0]['start']}-"
            f"{buckets[0]['end']} -> {buckets[-1]['loss']:.3f} at {buckets[-1]['start']}-{buckets[-1]['end']} | "
            f"passkey {accuracy:.0%} over {len(cells)} cells | {record['seconds']:.1f} s")

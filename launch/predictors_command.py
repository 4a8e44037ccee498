"""`longtrain train-predictors`: fit LeMo's per-layer block-score predictors for a job's model and corpus.

Why a command: predictors are model- and data-specific and trained once, offline, with the model frozen; the
training math lives in `orchestrator.memory.token_elim_predictors`, this only builds the model and prints.
"""

from pathlib import Path
from typing import Optional, Sequence

import torch

from launch.paths import check_writable_file
from spec.config import load_job_config
from spec.config.schema import TEXT_SOURCES
from orchestrator.data import build_windows
from orchestrator.checkpoint import load_init_from
from orchestrator.memory.token_elim_predictors import default_path, train_predictors
from orchestrator.model import LlamaModel


def run_train_predictors(config_path: Optional[str], overrides: Sequence[str], steps: int,
                         out: Optional[str]) -> int:
    job = load_job_config(config_path, [*overrides, "token_elim.enabled=true"])  # checked as the job it serves
    check_writable_file(out or default_path(job), "--out" if out else "the predictors file")
    torch.manual_seed(job.train.seed)  # the same initial weights as `longtrain train` when there is no init_from
    model = LlamaModel(job.model)
    if job.model.init_from:
        load_init_from(model, job.model.init_from, trust=job.checkpoint.trust_pickles)
    if job.data.source in TEXT_SOURCES:  # documents (packing=stream: token elimination refuses packed ones)
        from launch.prepare_command import ensure_prepared

        ensure_prepared(job)
    windows = build_windows(job.data, job.model.vocab_size, job.train.seed)
    path = Path(out or default_path(job))
    report = train_predictors(job, model, windows, steps, path)
    print(f"trained {len(report.recall)} predictors for {steps} steps "
          f"({job.data.micro_batch_size} x {job.data.seq_len} tokens each) -> {report.path}")
    for layer, recall in sorted(report.recall.items()):
        print(f"  layer {layer}: held-out top-k block recall {recall:.3f} (keep ratio {job.token_elim.keep_ratio}; "
              f"keeping the last blocks: {report.last_blocks_recall[layer]:.3f}), "
              f"final loss {report.final_loss.get(layer, float('nan')):.4f}")
    print(f"use them: longtrain train token_elim.enabled=true token_elim.predictors={report.path}")
    return 0

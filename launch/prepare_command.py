"""`longtrain prepare-data CONFIG [overrides]`: tokenize a jsonl, parquet or text source once into the prepared
directory `longtrain train` reads (and `longtrain train` calls `ensure_prepared` itself before Ray starts).

Why on the driver, before any worker: every worker reads the same token file and offsets (memory-mapped) and finds
them through `data.prepared`, which this sets; tokenizing in each worker would repeat the work per rank.
"""

import json
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from launch.prepare.cache import cache_root, content_key
from launch.prepare.encoders import choose_encoder
from launch.prepare.pipeline import default_workers, tokenize
from launch.prepare.sources import make_tasks, source_files
from launch.prepare.summary import file_names, histogram_png, length_stats, report, stream_stats
from launch.prepare.tokenizer import load_spec
from spec.config import JobConfig, load_job_config
from spec.config.schema import TEXT_SOURCES
from spec.errors import ConfigError
from spec.prepared import (FORMAT_VERSION, HISTOGRAM_FILE, OFFSETS_FILE, SUMMARY_FILE, packing_summary_file,
                           read_summary)


@dataclass
class Prepared:
    directory: Path
    summary: dict
    sequences: dict
    created: bool

    def report(self, job: JobConfig) -> str:
        return report(self.directory, self.summary, self.sequences, job.data, self.created)


def run_prepare_data(config_path: Optional[str], overrides: Sequence[str], workers: Optional[int]) -> int:
    job = load_job_config(config_path, overrides)
    if job.data.source not in TEXT_SOURCES:
        raise ConfigError(f"prepare-data tokenizes data.source=jsonl, parquet or text; this job has "
                          f"data.source={job.data.source}, which needs no preparing")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers ({workers}) must be >= 1")
    print(ensure_prepared(job, workers).report(job))
    return 0


def ensure_prepared(job: JobConfig, workers: Optional[int] = None) -> Prepared:
    """The job's prepared directory, tokenized now if no directory of its content hash exists; sets
    job.data.prepared (and an absolute job.data.cache_dir) for the workers."""
    data = job.data
    files = source_files(data.source, data.path)
    tokenizer = load_spec(data, job.model)
    root = cache_root(data)
    root.mkdir(parents=True, exist_ok=True)
    directory = root / content_key(root, files, data, tokenizer)
    created = not (directory / SUMMARY_FILE).is_file()
    if created:
        _prepare(directory, files, tokenizer, job, workers or default_workers())
    data.prepared, data.cache_dir = str(directory), str(root)
    sequences = ensure_packing(directory, job) if data.packs_documents else stream_stats(
        read_summary(str(directory))["tokens"], data)
    return Prepared(directory, read_summary(str(directory)), sequences, created)


def _prepare(directory: Path, files, tokenizer, job: JobConfig, workers: int) -> None:
    """Tokenize into a temporary directory beside the final one and rename it when complete (a crash leaves no
    half-prepared directory under the final name; a concurrent preparation of the same key wins or loses whole)."""
    tmp = directory.with_name(f".{directory.name}.tmp-{datetime.now().strftime('%H%M%S%f')}")
    tmp.mkdir(parents=True)
    try:
        summary = _tokenize_into(tmp, files, tokenizer, job, workers)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        try:
            tmp.rename(directory)
        except OSError:
            if not (directory / SUMMARY_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_into(tmp: Path, files, tokenizer, job: JobConfig, workers: int) -> dict:
    from tqdm import tqdm

    data = job.data
    tasks = make_tasks(data.source, files)
    total = sum(task.size for task in tasks)
    started = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None, leave=False) as bar:
        def progress(size: int, documents: int) -> None:
            bar.update(size)

        done = tokenize(tmp, tasks, tokenizer, data.source, data.text_field, workers, progress,
                        lambda spec: choose_encoder(spec, tasks, data.source, data.text_field))
    seconds = time.perf_counter() - started
    if not done.documents:
        raise ConfigError(f"data.path ({data.path}) holds no documents with text ({done.empty} empty); check "
                          "data.text_field and the files")
    summary = {"format": FORMAT_VERSION, "source": data.source, "files": file_names(files), "source_bytes": total,
               "text_field": data.text_field, "tokenizer": tokenizer.path, "encoder": done.encoder,
               "vocab_size": tokenizer.vocab_size,
               "prefix_tokens": list(tokenizer.prefix_tokens), "suffix_tokens": list(tokenizer.suffix_tokens),
               "token_dtype": tokenizer.token_dtype, "documents": done.documents, "tokens": done.tokens,
               "empty_documents_skipped": done.empty, "lengths": length_stats(done.lengths),
               "seconds": round(seconds, 2), "workers": _processes(workers, len(tasks)),
               "peak_rss_mib": _peak_rss_mib(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    histogram_png(done.lengths, tmp / HISTOGRAM_FILE, f"{done.documents:,} documents, {done.tokens:,} tokens "
                                                      f"({data.source}: {data.path})")
    return summary


def _processes(workers: int, tasks: int) -> int:
    """Tokenizing processes the pipeline ran (one task or one worker: in this process)."""
    return 1 if workers <= 1 or tasks <= 1 else min(workers, tasks)


def _peak_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest tokenizing process (ru_maxrss: KiB on Linux)."""
    return {"driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "per_process": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def ensure_packing(directory: Path, job: JobConfig) -> dict:
    """The packing of the documents into sequences of data.seq_len (table and summary), made once per length."""
    from orchestrator.documents import pack, packing_stats, save_packing

    data = job.data
    path = directory / packing_summary_file(data.seq_len)
    if not path.is_file():
        offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
        pieces, firsts = pack(offsets, data.seq_len)
        save_packing(directory, pieces, firsts, data.seq_len)
        stats = packing_stats(pieces, firsts, data.seq_len)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(path)
    stats = json.loads(path.read_text())
    holdout = int(stats["sequences"] * data.holdout_fraction)
    return {**stats, "train_sequences": stats["sequences"] - holdout, "holdout_sequences": holdout}

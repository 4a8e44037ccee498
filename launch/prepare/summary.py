"""What a prepared source holds, in numbers and a picture: documents, tokens, the document-length distribution (and
its histogram), and how many sequences of data.seq_len they make, train and holdout."""

from pathlib import Path
from typing import Dict, List

import numpy as np

from spec.config import DataConfig

QUANTILES = (("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99))


def length_stats(lengths: np.ndarray) -> Dict[str, float]:
    if not len(lengths):
        return {}
    stats = {"min": int(lengths.min()), **{k: int(np.percentile(lengths, q)) for k, q in QUANTILES},
             "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
    return stats


def histogram_png(lengths: np.ndarray, path: Path, title: str) -> None:
    """Documents by length in tokens (log-spaced bins), written to `path` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(int(lengths.max()), 2)
    bins = np.unique(np.geomspace(1, top + 1, 60).astype(np.int64))
    figure, axis = plt.subplots(figsize=(7, 3.6))
    axis.hist(lengths, bins=bins, color="#4477aa")
    axis.set_xscale("log")
    axis.set_xlabel("document length (tokens, log scale)")
    axis.set_ylabel("documents")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def stream_stats(tokens: int, data: DataConfig) -> Dict[str, float]:
    """Windows of data.seq_len over the token stream (data.packing=stream)."""
    windows = max((tokens - 1) // data.seq_len, 0)
    holdout = int(windows * data.holdout_fraction)
    return {"seq_len": data.seq_len, "sequences": windows, "train_sequences": windows - holdout,
            "holdout_sequences": holdout}


def report(directory: Path, summary: dict, sequences: dict, data: DataConfig, created: bool) -> str:
    """The summary as the lines `longtrain prepare-data` prints."""
    how = (f"new: {summary['seconds']:.1f} s, {summary['source_bytes'] / 1e6 / max(summary['seconds'], 1e-9):.1f} "
           f"MB/s with {summary['workers']} processes; peak RSS {_rss(summary)}" if created
           else "reused: same files and tokenizer")
    framing = " ".join(list(summary["prefix_tokens"]) + ["..."] + list(summary["suffix_tokens"]))
    lengths = summary["lengths"]
    lines = [
        f"prepared   {directory}  ({how})",
        f"source     {summary['source']}: {len(summary['files'])} files, {summary['source_bytes'] / 1e9:.3f} GB",
        f"tokenizer  {summary['tokenizer']}: {summary['vocab_size']:,} ids; each document: {framing}"
        f"{'; encoded with ' + summary['encoder'] if 'encoder' in summary else ''}",
        f"documents  {summary['documents']:,} ({summary['empty_documents_skipped']:,} empty skipped)",
        f"tokens     {summary['tokens']:,} ({summary['token_dtype']})",
        "lengths    " + " | ".join(f"{k} {v:,}" for k, v in lengths.items()) + " tokens",
        f"histogram  {directory / 'lengths.png'}",
        _sequences_line(sequences, data),
    ]
    return "\n".join(lines)


def _rss(summary: dict) -> str:
    peak = summary["peak_rss_mib"]
    if summary["workers"] <= 1:
        return f"{peak['driver']:.0f} MiB"
    return f"{peak['driver']:.0f} MiB driver + {peak['per_process']:.0f} MiB per tokenizing process"


def _sequences_line(sequences: dict, data: DataConfig) -> str:
    packed = (f"packing=documents, {sequences['padding_fraction']:.1%} padding, attention "
              f"{sequences['attention_share']:.1%} of causal" if "attention_share" in sequences
              else "packing=stream")
    return (f"sequences  {sequences['sequences']:,} of data.seq_len={data.seq_len} ({packed}); train "
            f"{sequences['train_sequences']:,}, holdout {sequences['holdout_sequences']:,} "
            f"(data.holdout_fraction={data.holdout_fraction})")


def file_names(files: List[Path]) -> List[str]:
    return [str(f) for f in files]

"""What `longtrain eval` leaves: tables on stdout, perplexity.png (loss vs position, one line per model),
passkey.png (length x depth heatmap per model) and results.json, each written atomically."""

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import List

from orchestrator.eval.run import ModelResult

RESULTS_FILE, PERPLEXITY_PNG, PASSKEY_PNG = "results.json", "perplexity.png", "passkey.png"


def perplexity_table(results: List[ModelResult]) -> str:
    widths = [max(len(r.label), 24) for r in results]
    rows = [f"{'positions':>17}  " + "  ".join(f"{r.label:>{w}}" for r, w in zip(results, widths))]
    for i, bucket in enumerate(results[0].buckets):
        cells = "  ".join(f"{f'{r.buckets[i].loss:.4f} (ppl {r.buckets[i].perplexity:.2f})':>{w}}"
                          for r, w in zip(results, widths))
        rows.append(f"{bucket.start:>8}-{bucket.end:<8}  {cells}")
    return "\n".join(rows)


def passkey_table(result: ModelResult) -> str:
    depths = sorted({c.depth for c in result.cells})
    rows = [f"{result.label}: passkey accuracy (trials solved; digits right in brackets), length x depth",
            f"{'length':>9} " + " ".join(f"{f'depth {d:g}':>12}" for d in depths)]
    for length in sorted({c.length for c in result.cells}):
        row = {c.depth: c for c in result.cells if c.length == length}
        rows.append(f"{length:>9} " + " ".join(f"{f'{row[d].accuracy:.0%} ({row[d].token_accuracy:.0%})':>12}" for d in depths))
    return "\n".join(rows)


def write_all(out: Path, results: List[ModelResult], settings: dict) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    content = {"eval": settings, "models": [
        {**asdict(r), "buckets": [{**asdict(b), "perplexity": b.perplexity} for b in r.buckets],
         "cells": [{**asdict(c), "accuracy": c.accuracy} for c in r.cells]} for r in results]}
    _atomic(out / RESULTS_FILE, lambda f: f.write(json.dumps(content, indent=1).encode()))
    _save_png(out / PERPLEXITY_PNG, perplexity_figure(results))
    _save_png(out / PASSKEY_PNG, passkey_figure(results))
    return [out / RESULTS_FILE, out / PERPLEXITY_PNG, out / PASSKEY_PNG]


def perplexity_figure(results: List[ModelResult]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for r in results:
        mids = [(b.start + b.end) / 2 for b in r.buckets]
        axes.plot(mids, [b.loss for b in r.buckets], marker="o", label=r.label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("position in the sequence (bucket middle, tokens)")
    axes.set_ylabel("mean next-token loss (nats)")
    axes.set_title("Perplexity by position: falling = the context is used")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def passkey_figure(results: List[ModelResult]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results) + 1, 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        lengths, depths = sorted({c.length for c in r.cells}), sorted({c.depth for c in r.cells})
        grid = [[next(c.accuracy for c in r.cells if c.length == n and c.depth == d) for d in depths]
                for n in lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("depth (fraction of the context)")
        ax.set_ylabel("length (tokens)")
        ax.set_title(r.label[-40:], fontsize=9)
    figure.subplots_adjust(wspace=0.45)
    figure.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    return figure


def _save_png(path: Path, figure) -> None:
    import matplotlib.pyplot as plt

    try:
        _atomic(path, lambda f: figure.savefig(f, format="png", dpi=110))
    finally:
        plt.close(figure)


def _atomic(path: Path, write) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise

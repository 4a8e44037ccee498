"""`longtrain profile mfu RUN_DIR`: MFU per node and per rank of a finished (or running) run, from its
metrics.jsonl, as a Markdown table and a PNG chart over steps, written into the run directory."""

from pathlib import Path
from statistics import mean
from typing import Dict, List

from launch.aggregate import node_rows
from launch.metrics_file import read_records
from spec.errors import LongtrainError


def run_profile_mfu(run_dir: str, warmup_steps: int) -> int:
    steps = read_metrics(Path(run_dir))
    measured = [m for m in steps if m["step"] > warmup_steps] or steps[-1:]
    table = mfu_table(measured)
    report = Path(run_dir) / "mfu_report"
    report.with_suffix(".md").write_text(f"# MFU of {run_dir}\n\nCommand: `longtrain profile mfu {run_dir}` "
                                         f"(steps up to {warmup_steps} excluded as warm-up; MFU causal-halved, "
                                         "full-attention in brackets)\n\n" + table + "\n")
    plot_mfu(steps, report.with_suffix(".png"))
    print(table)
    print(f"wrote {report}.md and {report}.png")
    return 0


def read_metrics(run_dir: Path) -> List[Dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LongtrainError(f"{path} not found; pass the run directory a `longtrain train` printed "
                             "(it holds metrics.jsonl)")
    steps = [m for m in read_records(path) if m.get("kind") == "step"]
    broken = next((m for m in steps if not isinstance(m.get("step"), int) or not isinstance(m.get("rows"), list)), None)
    if broken is not None:
        raise LongtrainError(f"{path} has a step record without 'step' and 'rows' ({str(broken):.60}); it was not "
                             "written by `longtrain train`")
    if not steps:
        raise LongtrainError(f"{path} holds no logged step yet; wait for the first metrics line")
    return by_host(steps)


def by_host(steps: List[Dict]) -> List[Dict]:
    """The records with each rank's node label replaced by its host's first label `node{R}/{host}`: a resume or a
    restarted worker group gets a new Ray node id (and may get another node rank) on the same host, and one machine
    must stay one row."""
    names: Dict[str, str] = {}

    def host_label(label: str) -> str:
        parts = label.split("/")
        if len(parts) != 3:
            return label
        return names.setdefault(parts[1], "/".join(parts[:2]))

    return [dict(m, rows=[dict(r, node=host_label(r["node"])) for r in m["rows"]]) for m in steps]


def segments(points: List) -> List[List]:
    """(step, value) points cut where the step goes back (a restart re-logs the steps after its checkpoint), so a
    chart draws each stretch as its own line instead of a zigzag."""
    pieces = [[]]
    for point in points:
        if pieces[-1] and point[0] <= pieces[-1][-1][0]:
            pieces.append([])
        pieces[-1].append(point)
    return [piece for piece in pieces if piece]


def mfu_table(steps: List[Dict]) -> str:
    lines = ["| node / rank | MFU | tokens/s | slowest step s | peak allocated GiB |", "| --- | --- | --- | --- | --- |"]
    nodes = {}
    for message in steps:
        for row in node_rows(message["rows"]):
            nodes.setdefault(row.node, []).append(row)
    for node, rows in sorted(nodes.items()):
        lines.append(f"| **{node}** ({rows[0].num_ranks} ranks) | {mean(r.mfu for r in rows):.2%} "
                     f"({mean(r.mfu_full_attention for r in rows):.2%}) | {mean(r.tokens_per_second for r in rows):,.0f} | "
                     f"{max(r.slowest_step_seconds for r in rows):.3f} | {max(r.peak_allocated_gib for r in rows):.2f} |")
        for rank in sorted({r["rank"] for m in steps for r in m["rows"] if r["node"] == node}):
            mine = [r for m in steps for r in m["rows"] if r["rank"] == rank]
            lines.append(f"| rank {rank} | {mean(r['mfu'] for r in mine):.2%} "
                         f"({mean(r['mfu_full_attention'] for r in mine):.2%}) | "
                         f"{mean(r['tokens_per_second'] for r in mine):,.0f} | "
                         f"{max(r['step_seconds'] for r in mine):.3f} | {max(r['peak_allocated_gib'] for r in mine):.2f} |")
    return "\n".join(lines)


def _plot_segments(axis, points: List, style: Dict, label: str) -> None:
    """One line per stretch between restarts, all in the first stretch's colour, labelled once."""
    colour = None
    for index, piece in enumerate(segments(points)):
        (line,) = axis.plot(*zip(*piece), color=colour, label=label if index == 0 else None, **style)
        colour = line.get_color()


def plot_mfu(steps: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    for rank in sorted({r["rank"] for m in steps for r in m["rows"]}):
        points = [(m["step"], 100 * r["mfu"]) for m in steps for r in m["rows"] if r["rank"] == rank]
        _plot_segments(axis, points, dict(linewidth=1, alpha=0.6), f"rank {rank}")
    for node in sorted({r["node"] for m in steps for r in m["rows"]}):
        points = [(m["step"], 100 * row.mfu) for m in steps for row in node_rows(m["rows"]) if row.node == node]
        _plot_segments(axis, points, dict(linewidth=2.5), f"{node} (mean)")
    axis.set_title(f"MFU per rank and host over steps ({len(segments([(m['step'], 0) for m in steps]))} "
                   "stretch(es): a restart starts a new line)")
    axis.set_xlabel("step")
    axis.set_ylabel("MFU, % of the profile's peak (causal-halved)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""Per-node views of the per-rank step readings, and the run summary.

Why per node: a slow node (a bad NIC, a throttled GPU) is invisible in a cluster average; one row per node with
its slowest rank shows it.
"""

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Dict, List


@dataclass
class NodeRow:
    node: str
    num_ranks: int
    mfu: float
    mfu_full_attention: float
    tokens_per_second: float
    """Sum over the node's ranks."""
    slowest_rank: int
    slowest_step_seconds: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    host_rss_gib: float


def node_rows(rank_rows: List[Dict]) -> List[NodeRow]:
    """One row per node for one step's readings (MFU averaged over ranks, throughput summed)."""
    by_node = defaultdict(list)
    for row in rank_rows:
        by_node[row["node"]].append(row)
    return [_node_row(node, rows) for node, rows in sorted(by_node.items())]


def _node_row(node: str, rows: List[Dict]) -> NodeRow:
    slowest = max(rows, key=lambda r: r["step_seconds"])
    return NodeRow(node=node, num_ranks=len(rows), mfu=mean(r["mfu"] for r in rows),
                   mfu_full_attention=mean(r["mfu_full_attention"] for r in rows),
                   tokens_per_second=sum(r["tokens_per_second"] for r in rows),
                   slowest_rank=slowest["rank"], slowest_step_seconds=slowest["step_seconds"],
                   peak_allocated_gib=max(r["peak_allocated_gib"] for r in rows),
                   peak_reserved_gib=max(r["peak_reserved_gib"] for r in rows),
                   host_rss_gib=max(r["host_rss_gib"] for r in rows))


@dataclass
class RunSummary:
    first_step: int
    last_step: int
    first_loss: float
    last_loss: float
    tokens_per_second_per_worker: float
    nodes: List[NodeRow]
    """Averaged over the measured (post-warm-up) logged steps."""


def summarize(step_messages: List[Dict], warmup_steps: int) -> RunSummary:
    """Loss first -> last over all logged steps; throughput and MFU over logged steps after warm-up."""
    ordered = sorted(step_messages, key=lambda m: m["step"])
    measured = [m for m in ordered if m["step"] > warmup_steps] or ordered[-1:]
    per_step_nodes = [node_rows(m["rows"]) for m in measured]
    nodes = [_average_node(name, [row for rows in per_step_nodes for row in rows if row.node == name])
             for name in sorted({row.node for rows in per_step_nodes for row in rows})]
    all_rows = [row for m in measured for row in m["rows"]]
    return RunSummary(first_step=ordered[0]["step"], last_step=ordered[-1]["step"],
                      first_loss=mean_loss(ordered[0]), last_loss=mean_loss(ordered[-1]),
                      tokens_per_second_per_worker=mean(r["tokens_per_second"] for r in all_rows), nodes=nodes)


def mean_loss(step_message: Dict) -> float:
    return mean(row["loss"] for row in step_message["rows"])


def _average_node(name: str, rows: List[NodeRow]) -> NodeRow:
    slowest = max(rows, key=lambda r: r.slowest_step_seconds)
    return NodeRow(node=name, num_ranks=rows[0].num_ranks, mfu=mean(r.mfu for r in rows),
                   mfu_full_attention=mean(r.mfu_full_attention for r in rows),
                   tokens_per_second=mean(r.tokens_per_second for r in rows), slowest_rank=slowest.slowest_rank,
                   slowest_step_seconds=slowest.slowest_step_seconds,
                   peak_allocated_gib=max(r.peak_allocated_gib for r in rows),
                   peak_reserved_gib=max(r.peak_reserved_gib for r in rows),
                   host_rss_gib=max(r.host_rss_gib for r in rows))

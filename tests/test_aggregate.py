"""Per-node aggregation and the run summary, on made-up per-rank rows whose answers are worked out by hand."""

import pytest

from launch.aggregate import node_rows, summarize


def _row(rank, node, step_seconds, tokens_per_second, mfu, loss=1.0, allocated=1.0):
    return {"rank": rank, "node": node, "step_seconds": step_seconds, "tokens_per_second": tokens_per_second,
            "mfu": mfu, "mfu_full_attention": 2 * mfu, "loss": loss, "peak_allocated_gib": allocated,
            "peak_reserved_gib": allocated + 1, "host_rss_gib": 3.0 + rank}


ROWS = [_row(0, "a", 1.0, 100.0, 0.40, allocated=5.0), _row(1, "a", 1.5, 80.0, 0.30, allocated=7.0),
        _row(2, "b", 0.9, 120.0, 0.50, allocated=2.0)]


def test_a_node_row_means_mfu_sums_throughput_and_names_its_slowest_rank():
    a, b = node_rows(ROWS)
    assert (a.node, a.num_ranks, b.node, b.num_ranks) == ("a", 2, "b", 1)
    assert a.mfu == pytest.approx(0.35) and a.mfu_full_attention == pytest.approx(0.70)
    assert a.tokens_per_second == pytest.approx(180.0) and b.tokens_per_second == pytest.approx(120.0)
    assert (a.slowest_rank, a.slowest_step_seconds) == (1, 1.5)
    assert (a.peak_allocated_gib, a.peak_reserved_gib, a.host_rss_gib) == (7.0, 8.0, 4.0)


def test_the_summary_leaves_out_warm_up_steps_and_averages_the_rest():
    steps = [{"step": 1, "rows": [_row(0, "a", 9.0, 10.0, 0.01, loss=5.0), _row(1, "a", 9.0, 10.0, 0.01, loss=7.0)]},
             {"step": 2, "rows": [_row(0, "a", 1.0, 100.0, 0.40, loss=3.0), _row(1, "a", 2.0, 50.0, 0.20, loss=3.0)]},
             {"step": 3, "rows": [_row(0, "a", 1.0, 120.0, 0.60, loss=2.0), _row(1, "a", 1.2, 90.0, 0.40, loss=1.0)]}]
    summary = summarize(list(reversed(steps)), warmup_steps=1)
    assert (summary.first_step, summary.last_step) == (1, 3)
    assert (summary.first_loss, summary.last_loss) == (6.0, 1.5)  # the mean over ranks; warm-up steps count here
    assert summary.tokens_per_second_per_worker == pytest.approx((100 + 50 + 120 + 90) / 4)  # step 1 left out
    (node,) = summary.nodes
    assert node.mfu == pytest.approx((0.30 + 0.50) / 2)  # per step: mean over ranks; then mean over steps
    assert node.tokens_per_second == pytest.approx((150 + 210) / 2)
    assert (node.slowest_rank, node.slowest_step_seconds) == (1, 2.0)


def test_a_run_shorter_than_its_warm_up_is_summarised_by_its_last_step():
    steps = [{"step": 1, "rows": [_row(0, "a", 2.0, 10.0, 0.1)]}, {"step": 2, "rows": [_row(0, "a", 1.0, 30.0, 0.3)]}]
    summary = summarize(steps, warmup_steps=5)
    assert summary.tokens_per_second_per_worker == pytest.approx(30.0) and summary.nodes[0].mfu == pytest.approx(0.3)

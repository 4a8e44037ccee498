"""metrics.jsonl: whole lines or nothing on write, a cut-off last line skipped on read (`longtrain profile mfu`
included), the fragment a killed writer left cut off when a resumed run reopens the file."""

import json
import resource
import signal

import pytest

from launch.cli import main
from launch.metrics_file import MetricsFile, read_records
from spec.errors import LongtrainError


def _step(step: int) -> dict:
    row = {"step": step, "rank": 0, "node": "node0", "loss": 2.0, "step_seconds": 0.1, "mfu": 0.5,
           "mfu_full_attention": 0.6, "tokens_per_second": 1000.0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0,
           "host_rss_gib": 0.5, "swap_host_gib": 0.0}
    return {"kind": "step", "step": step, "rows": [row]}


def test_a_cut_off_last_line_is_skipped_by_every_reader(tmp_path, capsys):
    text = "".join(json.dumps(_step(s)) + "\n" for s in (10, 20)) + json.dumps(_step(30))[:57]
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [10, 20]
    assert main(["profile", "mfu", str(tmp_path), "--warmup-steps", "0"]) == 0
    assert "| rank 0 | 50.00% (60.00%)" in capsys.readouterr().out


def test_a_damaged_line_before_the_last_is_one_line_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_step(10))[:30] + "\n" + json.dumps(_step(20)) + "\n")
    with pytest.raises(LongtrainError, match="metrics.jsonl line 1 is not a JSON record"):
        read_records(tmp_path / "metrics.jsonl")


def test_reopening_cuts_a_fragment_so_new_lines_stay_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_step(10)) + "\n" + json.dumps(_step(20))[:40])  # a writer killed mid-line
    metrics = MetricsFile(path)
    metrics.append(_step(21))
    metrics.close()
    assert [r["step"] for r in read_records(path)] == [10, 21]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2


def test_a_write_that_does_not_fit_leaves_no_partial_line(tmp_path):
    """RLIMIT_FSIZE makes the kernel write only part of the line (what a nearly full disk does) and fail after."""
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsFile(path)
    metrics.append(_step(1))
    whole = path.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(whole) + 100, limits[1]))
    try:
        with pytest.raises(OSError) as caught:
            metrics.append(_step(2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
        metrics.close()
    assert caught.value.filename == str(path)
    assert path.read_bytes() == whole

"""The timeline reader that tells whether host copies hid under compute, on a hand-made trace."""

import pytest

from launch.bench_command import parse_policy
from launch.measure.trace import describe, timeline_summary
from spec.errors import LongtrainError


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_copy_hidden_only_where_a_kernel_runs():
    events = [_event("kernel", "gemm", 0, 100), _event("kernel", "gemm", 150, 50),
              _event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 50, 100),  # 50 us under kernels
              _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 200, 40),  # after every kernel: exposed
              _event("cuda_runtime", "cudaStreamSynchronize", 0, 30)]
    summary = timeline_summary(events)
    assert summary["span_s"] == pytest.approx(240e-6)
    assert summary["kernel_busy_s"] == pytest.approx(150e-6)
    assert summary["d2h_s"] == pytest.approx(100e-6) and summary["h2d_s"] == pytest.approx(40e-6)
    assert summary["copy_hidden_s"] == pytest.approx(50e-6)
    assert summary["idle_s"] == pytest.approx(90e-6)
    assert summary["host_cudaStreamSynchronize_s"] == pytest.approx(30e-6)
    assert "36% of it under kernels" in describe(summary)


def test_policy_argument():
    policy = parse_policy("0.2/0.5/0.3/host")
    assert (policy.keep_fraction, policy.swap_fraction, policy.recompute_fraction, policy.offload_skeletal) == \
        (0.2, 0.5, 0.3, True)
    for bad in ("0/1", "0.5/0.6/0", "0/1/0/disk", "a/b/c"):
        with pytest.raises(LongtrainError, match="--policy"):
            parse_policy(bad)


def test_the_fragmentation_note_splits_reserved_spare_into_holes_and_whole_segments():
    """Issue 20's measure in a bench row: reserved - allocated against 2% of the allocated peak, and how much of it
    the allocator's split blocks held (holes) at most."""
    from launch.measure.bench import BenchRow, fragmentation_note

    row = BenchRow("longtrain", 262144, "ok", peak_allocated_gib=98.5, peak_reserved_gib=124.6,
                   inactive_split_peak_gib=3.14)
    assert fragmentation_note(row) == ("reserved - allocated 26.1 GiB (26%): holes at most 3.1 GiB, the rest whole "
                                       "cached segments")
    row.inactive_split_peak_gib = 40.0  # the two peaks at other moments: never more holes than spare
    assert "holes at most 26.1 GiB" in fragmentation_note(row)
    assert fragmentation_note(BenchRow("longtrain", 131072, "ok", peak_allocated_gib=73.4,
                                       peak_reserved_gib=74.7)) == ""  # 1.8%: within the 2%


def test_a_wrong_bench_flag_is_named_on_a_machine_without_a_gpu(tmp_path, capsys, monkeypatch):
    """A typo in --policy or --modes gets its own one-line error before the GPU check (a laptop user would
    otherwise only hear that there is no GPU), exit 2, nothing written."""
    import torch

    from launch.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this check on a GPU machine too
    monkeypatch.chdir(tmp_path)
    for flags, named in ((["--policy", "2/0/0"], "--policy '2/0/0'"), (["--modes", "store_al"], "--modes store_al")):
        assert main(["bench", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert not any(tmp_path.iterdir())

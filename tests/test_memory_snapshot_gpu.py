"""`metrics.memory_snapshot_steps` on a GPU: the recorder writes one snapshot at its last step, under its final
name only, with the allocator's segments and the recorded allocations (PyTorch's viewer format)."""

import pickle

import pytest
import torch

from orchestrator.memory_snapshot import Recorder, snapshot_path
from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


def test_the_snapshot_is_written_once_at_the_last_recorded_step(tmp_path):
    recorder = Recorder(2, 5, tmp_path, 0)  # a resume at step 5: records steps 6 and 7
    kept = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert recorder.after_step(6) is None and not snapshot_path(tmp_path, 0).exists()
    assert recorder.after_step(7) == snapshot_path(tmp_path, 0)
    snapshot = pickle.loads(snapshot_path(tmp_path, 0).read_bytes())
    assert snapshot["segments"] and any(trace for trace in snapshot["device_traces"])
    assert [p.name for p in tmp_path.iterdir()] == ["memory_snapshot_rank0.pickle"]  # no .partial left behind
    assert recorder.after_step(8) is None  # once
    del kept

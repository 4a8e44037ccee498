"""A save that dies after DeepSpeed wrote its files but before longtrain marked the tag complete: the tag stays
incomplete, `latest` keeps naming the previous tag, and a resume loads that one. Real DeepSpeed engine (ZeRO-2,
one gloo rank); only the crash is staged, by an engine whose save raises once DeepSpeed's own save returned."""

from pathlib import Path

import pytest

from tests.conftest import spawn_gloo

pytestmark = pytest.mark.slow


class _DiesAfterDeepSpeedFiles:
    """The real engine, except that `save_checkpoint` raises (a full disk) after DeepSpeed's files are written."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def save_checkpoint(self, *args, **kwargs):
        self.engine.save_checkpoint(*args, **kwargs)
        raise OSError(28, "No space left on device")


def _worker(rank, world, put, checkpoint_dir):
    import deepspeed
    import torch
    import torch.distributed as dist

    from orchestrator.checkpoint import COMPLETE_MARKER, CheckpointManager, latest_complete_tag
    from orchestrator.ds_config import deepspeed_config
    from orchestrator.model import LlamaModel
    from spec.config import load_job_config

    job = load_job_config(None, ["cluster.num_workers=1", "train.zero_stage=2"])
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(job, False))
    manager = CheckpointManager(Path(checkpoint_dir), keep_last=3, rank=rank, barrier=dist.barrier)
    manager.save(engine, 2, {}, {"data": {}})
    try:
        manager.save(_DiesAfterDeepSpeedFiles(engine), 4, {}, {"data": {}})
        put(("raised", False))
    except OSError:
        put(("raised", True))
    tags = Path(checkpoint_dir)
    put(("deepspeed_files_of_4", any((tags / "step_00000004").glob("*model_states.pt"))))
    put(("complete_4", (tags / "step_00000004" / COMPLETE_MARKER).exists()))
    put(("latest", (tags / "latest").read_text().strip()))
    put(("resumable", latest_complete_tag(tags)))
    put(("loaded_step", manager.load(engine, latest_complete_tag(tags))["step"]))


def test_a_save_that_dies_before_its_marker_leaves_the_previous_checkpoint_the_one_that_loads(tmp_path):
    results = dict(spawn_gloo(_worker, 1, str(tmp_path / "checkpoints")))
    assert results["raised"] and results["deepspeed_files_of_4"]  # the crash came after DeepSpeed's own files
    assert not results["complete_4"]
    assert results["latest"] == results["resumable"] == "step_00000002"
    assert results["loaded_step"] == 0  # DeepSpeed's step count of the tag that loaded (no step ran before it)

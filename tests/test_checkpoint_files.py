"""Checkpoint bookkeeping without DeepSpeed: incomplete tags, `latest`, what `resume=` resolves to (exact run names,
RUN_DIR:TAG, an empty value), pruning, checksums, the rank file's pickle-free format and the run directory lock."""

import json

import pytest

from launch.rundir import place_run
from orchestrator.checkpoint import (COMPLETE_MARKER, complete_tags, foreign_checkpoint_warning, latest_complete_tag,
                                     tag_for_step)
from spec.config import load_job_config
from spec.errors import CheckpointError, ConfigError


def _fake_run(root, name, steps, complete=True):
    run_dir = root / name
    for step in steps:
        tag_dir = run_dir / "checkpoints" / tag_for_step(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
        if complete:
            (tag_dir / COMPLETE_MARKER).write_text("{}")
    return run_dir


def test_incomplete_tag_is_skipped_with_a_warning(tmp_path):
    run_dir = _fake_run(tmp_path, "r", [10, 20])
    (run_dir / "checkpoints" / tag_for_step(20) / COMPLETE_MARKER).unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_complete_tag(run_dir / "checkpoints") == tag_for_step(10)


def test_tags_sort_by_step(tmp_path):
    run_dir = _fake_run(tmp_path, "r", [100, 20, 3])
    assert complete_tags(run_dir / "checkpoints") == [tag_for_step(s) for s in (3, 20, 100)]


def test_resume_auto_picks_the_newest_run_with_a_checkpoint(tmp_path):
    _fake_run(tmp_path, "demo-20260101-000000", [5])
    newest = _fake_run(tmp_path, "demo-20260102-000000", [7])
    (tmp_path / "demo-20260103-000000").mkdir()  # newer but without checkpoints
    job = load_job_config(None, [f"run.root={tmp_path}", "run.name=demo", "resume=auto"])
    placement = place_run(job)
    assert placement.run_dir == newest.resolve() and placement.continuing


def test_resume_auto_without_checkpoints_says_how_to_start(tmp_path):
    job = load_job_config(None, [f"run.root={tmp_path}", "resume=auto"])
    with pytest.raises(CheckpointError, match="start without resume"):
        place_run(job)


def test_resume_from_a_plain_deepspeed_dir_starts_a_new_run(tmp_path):
    ds_dir = tmp_path / "ds"
    (ds_dir / "global_step9").mkdir(parents=True)
    (ds_dir / "latest").write_text("global_step9")
    job = load_job_config(None, [f"run.root={tmp_path / 'runs'}", f"resume={ds_dir}"])
    placement = place_run(job)
    assert not placement.continuing and placement.initial.tag == "global_step9"
    assert foreign_checkpoint_warning(placement, trust=False) is None  # nothing that could run code is loaded
    assert "checkpoint.trust_pickles=true" in foreign_checkpoint_warning(placement, trust=True)
    assert not (tmp_path / "runs").exists()  # nothing is written before the workers start


def test_resume_with_unknown_tag_lists_the_tags(tmp_path):
    run_dir = _fake_run(tmp_path, "x", [4])
    job = load_job_config(None, [f"resume={run_dir / 'checkpoints'}:step_99"])
    with pytest.raises(CheckpointError, match="step_00000004"):
        place_run(job)


def test_explicit_run_dir_with_checkpoints_is_not_overwritten(tmp_path):
    run_dir = _fake_run(tmp_path, "x", [4])
    job = load_job_config(None, [f"run.dir={run_dir}"])
    with pytest.raises(ConfigError, match="resume=auto"):
        place_run(job)


def test_continuing_a_run_with_another_model_shape_is_refused_before_writing(tmp_path):
    from orchestrator.checkpoint import check_same_model
    from spec.config import job_to_yaml

    run_dir = _fake_run(tmp_path, "demo-20260101-000000", [5])
    (run_dir / "config.yaml").write_text(job_to_yaml(load_job_config()))
    before = sorted(p.name for p in run_dir.iterdir())
    job = load_job_config(None, [f"resume={run_dir}", "model.num_layers=3"])
    with pytest.raises(CheckpointError, match="model.num_layers=4, this job has 3"):
        check_same_model(job, place_run(job))
    assert sorted(p.name for p in run_dir.iterdir()) == before
    check_same_model(load_job_config(None, [f"resume={run_dir}", "train.max_steps=999"]), place_run(job))


def test_resume_auto_matches_the_run_name_exactly(tmp_path):
    """`run.name=exp` must not continue (and later prune) the newer run `exp-big-...`."""
    mine = _fake_run(tmp_path, "exp-20260101-000000", [5])
    _fake_run(tmp_path, "exp-big-20260102-000000", [9])
    _fake_run(tmp_path, "exp-20260101-000000-10", [6])  # same second, later suffix: newer than -2
    _fake_run(tmp_path, "exp-20260101-000000-2", [6])
    job = load_job_config(None, [f"run.root={tmp_path}", "run.name=exp", "resume=auto"])
    assert place_run(job).run_dir == (tmp_path / "exp-20260101-000000-10").resolve()
    (tmp_path / "exp-20260101-000000-10" / "checkpoints" / tag_for_step(6) / COMPLETE_MARKER).unlink()
    (tmp_path / "exp-20260101-000000-2" / "checkpoints" / tag_for_step(6) / COMPLETE_MARKER).unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        assert place_run(job).run_dir == mine.resolve()
    only_big = load_job_config(None, [f"run.root={tmp_path}", "run.name=ex", "resume=auto"])
    with pytest.raises(CheckpointError, match="no run named ex with a complete checkpoint"):
        place_run(only_big)


def test_resume_run_dir_and_tag_starts_a_new_run_from_that_tag(tmp_path):
    run_dir = _fake_run(tmp_path, "x-20260101-000000", [4, 8])
    job = load_job_config(None, [f"run.root={tmp_path / 'runs'}", f"resume={run_dir}:{tag_for_step(4)}"])
    placement = place_run(job)
    assert not placement.continuing and placement.run_dir != run_dir.resolve()
    assert (placement.initial.dir, placement.initial.tag) == (str((run_dir / "checkpoints").resolve()),
                                                              tag_for_step(4))


def test_resume_with_a_missing_tag_lists_the_tags_there(tmp_path):
    run_dir = _fake_run(tmp_path, "x-20260101-000000", [4, 8])
    job = load_job_config(None, [f"resume={run_dir}:step_00000005"])
    with pytest.raises(CheckpointError, match=r"tag step_00000005 not found .*; tags there: step_00000004, "
                                              r"step_00000008$"):
        place_run(job)


def test_resume_from_an_incomplete_tag_of_ours_is_refused(tmp_path):
    run_dir = _fake_run(tmp_path, "x-20260101-000000", [4, 8])
    tag_dir = run_dir / "checkpoints" / tag_for_step(8)
    (tag_dir / COMPLETE_MARKER).unlink()
    (tag_dir / "longtrain_rank0.pt").write_bytes(b"")
    job = load_job_config(None, [f"resume={run_dir}:{tag_for_step(8)}"])
    with pytest.raises(CheckpointError, match="is incomplete .*complete tags there: step_00000004"):
        place_run(job)


def test_an_empty_resume_is_an_error_not_a_fresh_run():
    with pytest.raises(ConfigError, match="resume= is empty"):
        load_job_config(None, ["resume="])


def test_pruning_keeps_the_last_tags_and_the_one_the_run_resumed_from(tmp_path):
    from orchestrator.checkpoint import CheckpointManager

    run_dir = _fake_run(tmp_path, "r", [10, 20, 30, 40])
    (run_dir / "checkpoints" / "step_20_notes").mkdir()  # not a tag of this run's format: never touched
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=2, rank=0, barrier=lambda: None)
    manager.resumed_tag = tag_for_step(10)
    manager._prune()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        tag_for_step(10), tag_for_step(30), tag_for_step(40), "step_20_notes"]


def test_the_rank_file_loads_without_pickle_and_restores_every_rng(tmp_path):
    """Format 2 holds tensors, numbers and strings only: torch's weights_only loader needs no allowlist."""
    import random

    import numpy as np
    import torch

    from orchestrator.checkpoint.manager import capture_rng_state, restore_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"format": 2, "rng": capture_rng_state(), "data": {"consumed_micro_batches": 7}}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    drawn = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_an_old_rank_file_with_numpy_states_still_loads_safely(tmp_path):
    import random

    import numpy as np
    import torch

    from orchestrator.checkpoint import load_file
    from orchestrator.checkpoint.manager import restore_rng_state

    old = {"data": {"consumed_micro_batches": 3},
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(old, tmp_path / "longtrain_rank0.pt")
    expected = np.random.random(2)
    restore_rng_state(load_file(tmp_path / "longtrain_rank0.pt", trust=False)["rng"])
    assert np.array_equal(np.random.random(2), expected)


def _tag_with_files(root, sizes):
    tag_dir = root / "checkpoints" / tag_for_step(4)
    tag_dir.mkdir(parents=True)
    for name, size in sizes.items():
        (tag_dir / name).write_bytes(bytes(range(256)) * (size // 256))
    return tag_dir


def test_checksums_cover_every_file_and_a_flipped_byte_names_the_file(tmp_path):
    """Two ranks hash the files they wrote; rank 0 merges the lists; the driver finds the changed shard."""
    from orchestrator.checkpoint import manifest, verify_checksums

    files = {"mp_rank_00_model_states.pt": 4096, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 8192,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 8192, "longtrain_rank0.pt": 512,
             "longtrain_rank1.pt": 512}
    tag_dir = _tag_with_files(tmp_path, files)
    _fake_run(tmp_path, "", [2])  # an earlier complete tag of the same run
    for rank in (0, 1):
        manifest.write_partial(tag_dir, rank, world_size=2)
    partial = json.loads((tag_dir / ".sha256.rank1.json").read_text())
    assert sorted(partial) == ["longtrain_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    sums = manifest.collect(tag_dir)
    assert sorted(sums) == sorted(files) and not list(tag_dir.glob(".sha256*"))
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps({"step": 4, manifest.SUMS_KEY: sums}))
    verify_checksums(tag_dir)
    shard = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[4000:4016] = bytes(16)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} does not match the checksum .*"
                                              f"resume={tmp_path}:step_00000002"):
        verify_checksums(tag_dir)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} is missing"):
        verify_checksums(tag_dir)

"""Checkpoint bookkeeping without DeepSpeed: incomplete tags, `latest`, and what `resume=` resolves to."""

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
    assert "pickles" in foreign_checkpoint_warning(placement)
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

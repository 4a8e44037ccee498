"""Operator commands of issue 23, in process through `launch.cli.main`: --version, config show / diff,
train --dry-run (starts nothing), --help's bench mode choices, and the fit search's smaller micro batch."""

import json
import re
import sys

import pytest
import yaml

from launch.cli import BENCH_MODES, main
from spec.config import load_job_config
from spec.errors import ConfigError


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("longtrain ")


def test_config_show_prints_the_resolved_job_with_overrides_and_defaults(capsys):
    assert main(["config", "show", "configs/default.yaml", "data.seq_len=512"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["seq_len"] == 512 and shown["metrics"]["trackers"] == ["tensorboard"]
    assert shown["model"]["num_layers"] == load_job_config(None, []).model.num_layers  # a default written out


def test_config_show_of_a_bad_key_is_one_line_exit_2(capsys):
    assert main(["config", "show", "model.num_layrs=3"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_config_diff_of_two_configs_names_each_differing_key(capsys):
    assert main(["config", "diff", "configs/default.yaml", "configs/llama7b_1m_8xa800.yaml"]) == 0
    out = capsys.readouterr().out
    assert "data.seq_len: 256 -> 1048576" in out and "cluster.num_workers: 2 -> 8" in out
    assert "run.name" in out and "optim.betas" not in out


def test_config_diff_reads_a_run_directorys_newest_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    main(["config", "show", "train.max_steps=100"])
    (run / "config.yaml").write_text(capsys.readouterr().out)
    main(["config", "show", "train.max_steps=600"])
    (run / "config.20991231-000000.yaml").write_text(capsys.readouterr().out)  # written by a resume
    assert main(["config", "diff", str(run), "configs/default.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2:] == ["train.max_steps: 600 -> 400"]
    assert main(["config", "diff", "configs/default.yaml", "default"]) == 0
    assert "same resolved config" in capsys.readouterr().out


def test_dry_run_checks_prints_deepspeed_json_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", "default", "train.zero_stage=1"]) == 0
    out = capsys.readouterr().out
    assert "nothing started" in out and "(new)" in out
    ds = json.loads(out[out.index("{"):])
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_micro_batch_size_per_gpu"] == 4
    assert list(tmp_path.iterdir()) == []  # no run directory, no lock, no logs
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_dry_run_fails_like_a_start_would(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", f"resume={tmp_path / 'nope'}"]) == 2
    assert "error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bench_help_lists_every_mode(capsys):
    from launch.measure.bench import MODES

    assert BENCH_MODES == MODES
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(mode in help_text for mode in MODES)


def test_fit_search_proposes_a_smaller_micro_batch(capsys):
    """The README example's micro batch of 8 does not fit: the fix names a smaller one."""
    code = main(["plan", "model.preset=llama-7b", "data.seq_len=262144", "data.micro_batch_size=8", "cluster.num_workers=2", "--profile",
                 "h100_sxm"])
    err = capsys.readouterr().err
    assert code == 2 and "no single change fits" not in err
    assert "it fits with data.micro_batch_size=1 train.grad_accum_steps=8 (same tokens per step)" in err


def test_fit_search_names_a_micro_batch_alone_when_that_is_enough():
    from planner.planning import _candidate_changes

    job = load_job_config(None, ["data.micro_batch_size=4", "train.grad_accum_steps=3"])
    labels = [label for label, _ in _candidate_changes(job)]
    assert labels[:2] == ["data.micro_batch_size=2 train.grad_accum_steps=6 (same tokens per step)",
                          "data.micro_batch_size=1 train.grad_accum_steps=12 (same tokens per step)"]
    assert not any("micro_batch" in label for label, _ in _candidate_changes(load_job_config(
        None, ["data.micro_batch_size=1"])))


def test_status_exit_codes_tell_scripts_how_a_job_ended():
    from launch.jobs import status_exit_code

    assert [status_exit_code(s) for s in ("SUCCEEDED", "RUNNING", "PENDING", "FAILED", "STOPPED")] == [0, 0, 0, 1, 3]


def test_profile_hardware_refuses_to_overwrite_a_shipped_profile(capsys):
    from spec.resources import HARDWARE_PROFILES_DIR

    shipped = HARDWARE_PROFILES_DIR / "h100_sxm.yaml"
    before = shipped.read_bytes()
    assert main(["profile", "hardware", "--quick", "--out", str(shipped)]) == 2
    err = capsys.readouterr().err
    assert "is a shipped hardware profile" in err and "--force" in err
    assert shipped.read_bytes() == before


def test_config_show_help_lists_every_key_with_its_schema_default(capsys):
    import dataclasses

    from spec.config import JobConfig

    with pytest.raises(SystemExit):
        main(["config", "show", "--help"])
    help_text = capsys.readouterr().out
    assert "metrics: hardware_profile=auto warmup_steps=3 trackers=[tensorboard]" in help_text
    for section in dataclasses.fields(JobConfig):
        assert f"  {section.name}" in help_text, section.name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "longtrain config show --help" in capsys.readouterr().out


def _step(step: int, node_id: str, mfu: float) -> dict:
    return {"kind": "step", "step": step, "rows": [
        {"step": step, "rank": rank, "node": f"node0/host-a/{node_id}", "loss": 1.0, "lr": 1e-3, "step_seconds": 0.5,
         "tokens": 10, "tokens_per_second": 20.0, "tflops": 0.1, "mfu": mfu, "mfu_full_attention": mfu,
         "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0, "host_rss_gib": 1.0, "swap_host_gib": 0.0}
        for rank in (0, 1)]}


def test_profile_mfu_after_a_restart_lists_one_node_per_host_and_draws_segments(tmp_path, capsys):
    """Steps 10-30 on Ray node abc, a restart record, steps 20-40 on node def of the same host (a new Ray)."""
    from launch.metrics_file import MetricsFile
    from launch.profile_command import segments

    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in (10, 20, 30):
        metrics.append(_step(step, "abc123", 0.4))
    metrics.append({"kind": "resumed", "step": 10, "path": "x"})
    for step in (20, 30, 40):
        metrics.append(_step(step, "def456", 0.5))
    metrics.close()
    assert main(["profile", "mfu", str(tmp_path), "--warmup-steps", "0"]) == 0
    table = capsys.readouterr().out
    assert table.count("**node0/host-a**") == 1 and table.count("| rank 0 |") == 1, table
    assert (tmp_path / "mfu_report.png").stat().st_size > 10_000
    assert segments([(10, 1), (20, 1), (30, 1), (20, 2), (30, 2)]) == [[(10, 1), (20, 1), (30, 1)], [(20, 2), (30, 2)]]


def test_jobs_table_has_run_name_status_and_age_in_columns_and_whole_overrides():
    from ray.job_submission import JobDetails, JobStatus

    from launch.jobs import jobs_table

    entry = "python -m launch.cli train configs/default.yaml {} run.root=/shared/runs cluster.address=auto"
    jobs = [JobDetails(type="SUBMISSION", entrypoint=entry.format("train.max_steps=1000 " + "x" * 0),
                       submission_id="raysubmit_old", status=JobStatus.FAILED, start_time=1_000_000),
            JobDetails(type="SUBMISSION", entrypoint=entry.format("run.name=long data.seq_len=512"),
                       submission_id="raysubmit_new", status=JobStatus.RUNNING, start_time=4_600_000)]
    lines = jobs_table(jobs, now=4_630).splitlines()
    assert lines[0].split() == ["job", "status", "age", "run", "overrides"]
    assert lines[1].split() == ["raysubmit_new", "RUNNING", "30s", "long", "data.seq_len=512",
                                "run.root=/shared/runs"]
    assert lines[2].split() == ["raysubmit_old", "FAILED", "1.0h", "default", "train.max_steps=1000",
                                "run.root=/shared/runs"]


def test_the_jobs_client_prints_no_ray_info_lines():
    """`Uploading package ...` is logged at INFO by the Jobs client's module logger (propagating to Ray's stderr
    handler); after quiet_ray_client only warnings and errors pass."""
    import logging

    import ray.dashboard.modules.dashboard_sdk as sdk

    from launch.jobs import quiet_ray_client

    quiet_ray_client()
    logger = logging.getLogger(sdk.__name__)
    assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)


def test_plan_png_budget_bar_adds_up_to_the_predicted_peak(tmp_path):
    """The bar of static parts + activation arena is the predicted peak (the LM head, which the arena's layout
    holds, is not counted twice), for a shipped run's plan."""
    from pathlib import Path

    from planner.report import budget_parts, plot_layout
    from spec.plan import load_plan

    plan = load_plan(Path("profiles/runs/h200_2026-12-01_llama3-8b-1gpu/longtrain_128k.plan.yaml"))
    parts = budget_parts(plan)
    assert sum(gib for _, gib in parts) == pytest.approx(plan.predicted["peak_gpu_gib"], abs=0.05)
    assert parts[-1][0] == "activation arena (incl. head_and_loss)"
    plot_layout(plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 50_000


def test_fit_search_names_optimizer_offload_when_it_is_the_fix(capsys):
    """Llama-1B at 64K on one H100 with a 30% budget: ZeRO-3 alone gains nothing on one GPU; moving the optimizer
    states and gradients to the host does (with the ZeRO stage ZeRO-Offload needs)."""
    code = main(["plan", "model.preset=llama-1b", "data.seq_len=65536", "cluster.num_workers=1",
                 "data.micro_batch_size=1", "train.zero_stage=0", "plan.gpu_memory_fraction=0.3", "--profile",
                 "h100_sxm"])
    assert code == 2
    assert ("it fits with train.offload.optimizer=true train.zero_stage=1 (optimizer states and gradients in host "
            "memory)") in capsys.readouterr().err


def test_help_lists_the_choices_validation_accepts_for_every_key_that_has_them():
    """key_choices (what --help prints) against the config's own validation: each key whose validation names a
    closed set of values for a wrong one is listed, with exactly that set. About 2 s."""
    from dataclasses import asdict

    from launch.config_command import _flatten, key_choices, keys_help
    from spec.config import JobConfig

    choices, named = key_choices(), {}
    for key, value in _flatten(asdict(JobConfig())).items():
        wrong = "[not-a-choice]" if isinstance(value, list) else "not-a-choice"
        try:
            load_job_config(None, [f"{key}={wrong}"])
        except ConfigError as error:
            found = re.search(rf"{re.escape(key)}(?: \('not-a-choice'\) must be one of| \('not-a-choice'\) is "
                              r"not a known preset; choose one of|: unknown not-a-choice; choose from) "
                              r"([\w, -]+?)(?: or |;|$)", str(error))
            if found:
                named[key] = tuple(found.group(1).split(", "))
    assert named == choices
    assert "precision=auto{auto|bf16|fp32}" in keys_help()

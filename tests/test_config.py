"""Config loading: defaults, presets, shipped configs, and one-line errors for bad input (exit code 2)."""

import subprocess
import sys

import pytest

from launch.cli import main
from spec.config import MODEL_PRESETS, list_shipped_configs, load_job_config
from spec.errors import ConfigError


def test_default_config_is_the_demo_job():
    job = load_job_config()
    assert job.model.preset == "debug" and job.cluster.num_workers == 2 and job.train.zero_stage == 2
    assert job.data.source == "corpus"


@pytest.mark.parametrize("path", list_shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    job = load_job_config(str(path))
    assert job.model.num_layers > 0


def test_preset_fills_shape_and_explicit_keys_override_it():
    job = load_job_config(None, ["model.preset=llama-7b", "model.num_layers=4", "data.seq_len=4096"])
    assert job.model.hidden_size == MODEL_PRESETS["llama-7b"]["hidden_size"]
    assert job.model.num_layers == 4


def test_yaml_file_is_overridden_by_command_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  num_layers: 3\ntrain:\n  max_steps: 50\n")
    job = load_job_config(str(path), ["train.max_steps=70"])
    assert (job.model.num_layers, job.train.max_steps) == (3, 70)


def test_cli_typo_exits_2_with_one_line_naming_the_key():
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", "model.num_layrs=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.num_layrs" in lines[0] and "num_layers" in lines[0]
    assert "Traceback" not in result.stderr


BAD_INPUTS = [
    (["model.num_layrs=3"], "model.num_layrs"),
    (["model.num_heads=5"], "model.num_heads (5) must divide model.hidden_size"),
    (["model.num_kv_heads=3"], "model.num_kv_heads (3) must divide model.num_heads"),
    (["data.seq_len=100"], "data.seq_len (100) must be a multiple of 64"),
    (["train.zero_stage=4"], "train.zero_stage (4) must be 0, 1, 2 or 3"),
    (["train.zero_stage=two"], "train.zero_stage"),
    (["model.preset=llama-70b"], "model.preset ('llama-70b') is not a known preset"),
    (["data.source=web"], "data.source ('web') must be one of"),
    (["data.source=tokens"], "data.path is required when data.source=tokens"),
    (["train.precision=fp8"], "train.precision ('fp8') must be one of"),
    (["optim.lr=-1"], "optim.lr (-1.0) must be > 0"),
    (["cluster.num_workers=0"], "cluster.num_workers (0) must be a positive integer"),
    (["model.vocab_size=100"], "model.vocab_size (100) must be >= 256 for data.source=corpus"),
    (["optim.warmup_steps=500", "train.max_steps=100"], "optim.warmup_steps (500) must be < train.max_steps"),
    (["no_equals_sign_here.yaml", "other.yaml"], "more than one config file"),
    (["missing.yaml"], "config file missing.yaml not found"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last (0) must be >= 1"),
    (["train.stop_at_step=999"], "train.stop_at_step (999) must be in 1..train.max_steps"),
    (["model.hidden_size=120", "model.num_heads=8"], "must be even for RoPE"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_with_exit_code_2(args, expected, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_job_config(None, ["data.seq_len=100", "train.zero_stage=7"])
    assert "data.seq_len" in str(caught.value) and "train.zero_stage" in str(caught.value)


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  num_layers: [1, 2\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "line" in err


def test_debug_flag_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["--debug", "train", "model.num_layrs=3"])


def test_train_makes_relative_file_paths_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train runs workers in the run's storage directory: a relative plan.path failed there (found on 4 x H200)."""
    from launch.train_command import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.plan.yaml").write_text("x")
    (tmp_path / "ckpt").mkdir()
    job = load_job_config(None, ["plan.path=plans/p.plan.yaml", "model.init_from=ckpt:global_step5"])
    job = with_absolute_paths(job)
    assert job.plan.path == str(tmp_path / "plans" / "p.plan.yaml")
    assert job.model.init_from == f"{tmp_path / 'ckpt'}:global_step5"
    assert with_absolute_paths(load_job_config(None, ["plan.path=missing.yaml"])).plan.path == "missing.yaml"

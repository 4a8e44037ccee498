"""What `submit` uploads: longtrain's packages, each from where it is imported (never the folder around them: for
an installed wheel that is site-packages), and the job's config file; packed by Ray's own packaging code, so the
shipped configs behind `spec/shipped`'s links and the bundled corpus travel too; and the config's name as submitted,
which the job's resume commands print. About 3 s."""

import zipfile
from pathlib import Path

from ray._private.runtime_env.packaging import create_package

from launch.jobs import (PACKAGES, SUBMITTED_CONFIG_ENV, _config_into, job_runtime_env, stop_report,
                         submitted_config_name)
from launch.train_command import config_as_named, resume_command


def test_the_job_ships_the_packages_and_the_config_file_only(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  max_steps: 3\n")
    work = tmp_path / "work"
    work.mkdir()
    assert _config_into(str(work), str(config)) == "mine.yaml"
    assert _config_into(str(work), "configs/default.yaml") == "default.yaml"  # a shipped config by name
    env = job_runtime_env(str(work))
    assert sorted(p.name for p in work.iterdir()) == ["default.yaml", "mine.yaml"]
    assert [Path(m).name for m in env["py_modules"]] == list(PACKAGES)
    names = set()
    for module in env["py_modules"]:
        target = tmp_path / f"{Path(module).name}.zip"
        create_package(module, target, include_gitignore=True, include_parent_dir=True, excludes=env["excludes"])
        names |= set(zipfile.ZipFile(target).namelist())
    assert "spec/shipped/configs/default.yaml" in names and "launch/cli.py" in names
    assert any(n.startswith("orchestrator/corpus/") and n.endswith(".gz") for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert {n.split("/")[0] for n in names} == set(PACKAGES)


def test_the_resume_commands_name_the_config_as_submitted_not_the_jobs_copy(tmp_path, monkeypatch):
    """The job runs `train mine.yaml` (its copy, in its working directory); the resume line it prints, and the
    `longtrain submit` that `stop` makes of it, name the file the user submitted, by its absolute path."""
    (tmp_path / "experiments").mkdir()
    config = tmp_path / "experiments" / "mine.yaml"
    config.write_text("train:\n  max_steps: 9\n")
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    copy = _config_into(str(work), "experiments/mine.yaml")
    env = job_runtime_env(str(work), submitted_config_name("experiments/mine.yaml"))["env_vars"]
    assert copy == "mine.yaml" and env[SUBMITTED_CONFIG_ENV] == str(config)
    monkeypatch.setenv(SUBMITTED_CONFIG_ENV, env[SUBMITTED_CONFIG_ENV])  # what the job's driver sees
    line = resume_command(config_as_named(copy), ["train.log_every_steps=5", "cluster.address=auto"],
                          Path("/shared/runs/default-1"))
    assert line == (f"longtrain train {config} train.log_every_steps=5 cluster.address=auto "
                    "resume=/shared/runs/default-1")
    logs = f"run summary\n  last step 5\nlongtrain: stopped by SIGTERM; resume with: {line}\n"
    assert stop_report(logs, "http://head:8265").splitlines()[-1] == (
        f"resume with: longtrain submit {config} train.log_every_steps=5 resume=/shared/runs/default-1 "
        "--address http://head:8265")
    assert submitted_config_name("llama7b_1m_8xh200") == "llama7b_1m_8xh200"  # a shipped config: found by name
    assert SUBMITTED_CONFIG_ENV not in job_runtime_env(str(work), submitted_config_name(None))["env_vars"]
    monkeypatch.delenv(SUBMITTED_CONFIG_ENV)
    assert config_as_named("experiments/mine.yaml") == "experiments/mine.yaml"  # `train` itself: as given

"""What `submit` uploads: longtrain's packages, each from where it is imported (never the folder around them: for
an installed wheel that is site-packages), and the job's config file; packed by Ray's own packaging code, so the
shipped configs behind `spec/shipped`'s links and the bundled corpus travel too. About 2 s."""

import zipfile
from pathlib import Path

from ray._private.runtime_env.packaging import create_package

from launch.jobs import PACKAGES, _config_into, job_runtime_env


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

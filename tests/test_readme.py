"""The README stays true: CI runs its test command, and it documents every config key."""

import dataclasses
import re
from pathlib import Path

from spec.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", README)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_command_runs_the_default():
    assert _readme_commands()[0].endswith("longtrain train")


def test_every_config_key_is_documented():
    for section in dataclasses.fields(JobConfig):
        schema = section.default_factory
        if schema is dataclasses.MISSING:  # a plain top-level key such as `resume`
            assert f"`{section.name}`" in README
            continue
        for key in dataclasses.fields(schema):
            assert f"`{section.name}.{key.name}`" in README, f"{section.name}.{key.name} missing from README"

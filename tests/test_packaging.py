"""The package as a user installs it: every third-party import declared, and a built wheel that finds its shipped
configs and hardware profiles from outside the checkout."""

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("spec", "orchestrator", "planner", "launch", "longtrain")
IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "ray": "ray", "pulp": "pulp", "grpc": "grpcio"}
PROVIDED_BY_TORCH = {"triton"}
"""Imported only on CUDA machines, where the CUDA builds of torch bring it."""
OPTIONAL_EXTRAS = {"wandb": "wandb", "mlflow": "mlflow", "flash_attn": "fa4"}
"""Import -> extra: imported only when installed and asked for (metrics.trackers, train.attention_kernel=fa4);
declared as extras, checked below."""


def _third_party_imports() -> set:
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - set(PACKAGES)


def test_every_third_party_import_is_declared():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in declared}
    missing = sorted(module for module in _third_party_imports() - PROVIDED_BY_TORCH - set(OPTIONAL_EXTRAS)
                     if IMPORT_TO_DISTRIBUTION.get(module, module) not in names)
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(OPTIONAL_EXTRAS.values()) <= set(extras), "each optional import is an extra: pip install -e '.[wandb]'"


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_plans_a_shipped_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    venv = tmp_path / "venv"  # the dependencies come from this interpreter's site-packages, the package from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    wheel = next((tmp_path / "dist").glob("longtrain-*.whl"))
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([venv / "bin" / "python", "-c", "import spec, longtrain; print(spec.__file__); "
                            "print(longtrain.__file__)"], cwd=outside, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(str(venv) in path for path in where)  # the wheel's copies (the Python API too), not the checkout's
    shipped = subprocess.run([venv / "bin" / "python", "-c", "from launch.jobs import package_dirs; "
                              "print(*package_dirs())"], cwd=outside, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
    site = Path(where[0]).parents[1]  # what `submit` must not upload whole
    assert [Path(d) for d in shipped] == [site / name for name in ("spec", "planner", "orchestrator", "launch",
                                                                   "longtrain")]
    plan = subprocess.run([venv / "bin" / "longtrain", "plan", "llama7b4l_128k_1xh100", "plan.time_limit_seconds=2",
                           "--out", "p.yaml"], cwd=outside, env=env, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "profile h100_sxm" in plan.stdout or "h100_sxm" in plan.stdout
    assert (outside / "p.yaml").is_file()

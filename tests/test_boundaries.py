"""The house's walls: which package may import which (README "Layout").

spec is the torch-free, solver-free contract; the planner and the runtime (orchestrator) both import it and never
each other; measurement (launch.measure) sits above both and only the CLI commands import it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "spec": {"spec"},
    "planner": {"spec", "planner"},
    "orchestrator": {"spec", "orchestrator"},
    "launch": {"spec", "planner", "orchestrator", "launch"},
    "longtrain": {"spec", "planner", "orchestrator", "launch", "longtrain"},  # the Python API, re-exported
}
SPEC_THIRD_PARTY = {"yaml", "omegaconf"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_it_stands_on(package):
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in sorted((REPO / package).rglob("*.py"))
             for name in _imports(path)
             if name.split(".")[0] in ALLOWED and name.split(".")[0] not in ALLOWED[package]]
    assert not wrong, wrong


def test_the_contract_needs_neither_torch_nor_a_solver():
    third_party = {name.split(".")[0] for path in (REPO / "spec").rglob("*.py") for name in _imports(path)}
    third_party -= set(sys.stdlib_module_names) | set(ALLOWED)
    assert third_party <= SPEC_THIRD_PARTY, third_party


def test_measurement_is_imported_only_by_cli_commands():
    importers = {str(path.relative_to(REPO)) for package in ALLOWED for path in (REPO / package).rglob("*.py")
                 if "measure" not in path.parts and any(n.startswith("launch.measure") for n in _imports(path))}
    assert all(name.startswith("launch/") and name.endswith("_command.py") for name in importers), importers


def test_a_worker_loads_no_solver_and_no_planner():
    probe = ("import sys, orchestrator.trainer; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pulp', 'highspy', 'planner')))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout

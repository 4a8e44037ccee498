"""A cluster address that cannot take us is one line in about a second, not Ray's ~20 s of GCS retries and a
traceback: `cluster.address=auto` resolving (through RAY_ADDRESS, as inside a submitted job) to a port nothing
listens on, and token mode without a token. Each in a fresh `longtrain train` (Ray reads its auth mode and token once
a process). A head that refuses a missing or wrong token: test_jobs.py, against its token-auth head. About 6 s."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port


def _train(tmp_path: Path, address: str, **env) -> tuple:
    """(exit code, stderr lines, seconds) of `longtrain train cluster.address=ADDRESS` with RAY_AUTH_* unset but
    for `env`; its run directory must not be left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))} | env
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", f"cluster.address={address}",
                             f"run.root={tmp_path / 'runs'}"], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return result.returncode, result.stderr.strip().splitlines(), time.monotonic() - started


def test_auto_resolving_to_a_port_nothing_listens_on_is_one_line_in_a_second(tmp_path):
    port = free_port()
    code, err, seconds = _train(tmp_path, "auto", RAY_ADDRESS=f"127.0.0.1:{port}")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("longtrain: error: cluster.address (auto: ") and f":{port}): no Ray GCS answers" in err[0]
    assert "the head's --port" in err[0] and seconds < 15, (seconds, err[0])  # Ray alone: ~20 s, then a traceback


def test_token_mode_without_a_token_is_one_line_naming_the_fix(tmp_path):
    """Ray's own client raises before sending anything."""
    code, err, _ = _train(tmp_path, f"127.0.0.1:{free_port()}", RAY_AUTH_MODE="token", HOME=str(tmp_path))
    assert code == 2 and len(err) == 1, err  # no ~/.ray/auth_token in that HOME
    assert "RAY_AUTH_MODE=token and no token is set on this machine; set RAY_AUTH_TOKEN" in err[0], err[0]

"""A head that has just started answers "No available agent to submit job" until its job agent is up; `submit`
waits for it (one notice line) instead of failing, gives up with one line after the wait, and passes any other
error through. The client here is a stand-in for the dashboard's HTTP answers (the race cannot be staged on demand
with a real head); the real submission path runs in tests/test_jobs.py."""

import pytest

from launch.jobs import submit_when_agent_ready
from spec.errors import LongtrainError

NOT_READY = "Request failed with status code 500: No available agent to submit job, please try again later.."


class Dashboard:
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0

    def submit_job(self, **job):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_submit_waits_for_the_job_agent_and_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr("launch.jobs.time.sleep", lambda seconds: None)
    dashboard = Dashboard([RuntimeError(NOT_READY), RuntimeError(NOT_READY), "raysubmit_1"])
    assert submit_when_agent_ready(dashboard, "http://127.0.0.1:8265", entrypoint="x") == "raysubmit_1"
    assert dashboard.calls == 3
    assert capsys.readouterr().err.count("job agent is not ready yet") == 1


def test_submit_gives_up_in_one_line_after_the_wait():
    dashboard = Dashboard([RuntimeError(NOT_READY)] * 100)
    with pytest.raises(LongtrainError, match="no job agent ready after 0 s"):
        submit_when_agent_ready(dashboard, "http://127.0.0.1:8265", wait_seconds=0.0, entrypoint="x")


def test_other_dashboard_errors_are_not_retried():
    dashboard = Dashboard([RuntimeError("Request failed with status code 400: bad runtime_env")])
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit_when_agent_ready(dashboard, "http://127.0.0.1:8265", entrypoint="x")
    assert dashboard.calls == 1

"""Pick the MIP solver (HiGHS when `highspy` is installed, CBC bundled with PuLP 3.x otherwise) and run it
quietly: HiGHS prints a banner from C on every model it creates, which would break the one-line-per-event
console of `longtrain plan`."""

import contextlib
import os
import sys

import pulp


def make_solver(time_limit_seconds: float):
    """A PuLP solver with a time limit, quiet; HiGHS preferred (faster on these models), CBC as fallback."""
    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_seconds, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_seconds)


def solve_quietly(problem: pulp.LpProblem, solver) -> None:
    with _stdout_to_devnull():
        problem.solve(solver)


@contextlib.contextmanager
def _stdout_to_devnull():
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def solver_name(solver) -> str:
    return "HiGHS" if isinstance(solver, pulp.HiGHS) else "CBC"


def status_name(problem: pulp.LpProblem) -> str:
    return pulp.LpStatus[problem.status]

"""Ctrl-C during a run: the first stops it cleanly, a second one stops the driver at once; SIGTERM stops it like
the first Ctrl-C.

Why: the first Ctrl-C raises KeyboardInterrupt as usual, and the driver stops the workers, shuts Ray down (a few
seconds) and prints the resume command. A second Ctrl-C in that window used to interrupt the cleanup itself and
print a 31-line traceback from inside Ray. Here it prints one line and ends the process; the local Ray's processes
are left to `launch.guard`, which ends them once the driver is gone.
"""

import os
import re
import signal
import sys
from contextlib import contextmanager
from typing import Callable


@contextmanager
def second_interrupt_exits(hint: Callable[[], str], code: int):
    """Within the block: SIGINT raises KeyboardInterrupt once; any later one writes 'interrupted again' and the
    resume hint (`hint()`) to stderr and exits with `code` without cleanup."""
    received = []

    def handle(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt
        line = re.sub(r"^resume with +", "resume with: ", hint())
        try:
            sys.stdout.flush()
        except Exception:  # interrupted inside a write to stdout: what it held is lost, the line below is not
            pass
        os.write(2, f"longtrain: interrupted again, stopped at once; {line}\n".encode())
        os._exit(code)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class StopRequested(KeyboardInterrupt):
    """SIGTERM: `longtrain stop` (Ray's job supervisor sends it), `ray job stop`, a scheduler or `kill`."""


@contextmanager
def sigterm_stops():
    """Within the block: SIGTERM raises StopRequested, so the run stops as on Ctrl-C (the summary so far and the
    resume command), instead of `ray.init`'s handler, whose `sys.exit` in the middle of Ray Train left stack dumps
    in the job's logs and no summary. Enter it after `ray.init`, which installs that handler."""
    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise StopRequested

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

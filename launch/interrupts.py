"""Ctrl-C during a run: the first stops it cleanly, a second one stops the driver at once.

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

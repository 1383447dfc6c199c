"""Ctrl-C and SIGTERM during training: finish the current step, save it, then stop.

A run killed between two writes could leave nothing consistent to resume from, and one killed in
the middle of a long step would lose that step. So while `train` runs, the first SIGINT/SIGTERM
only sets a flag that the loop reads after each step (it then saves that step and raises
`TrainingStopped`); a second one interrupts at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class StopRequest:
    """Set by SIGINT/SIGTERM while training: the name of the signal, or None."""

    requested: str | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While inside, the first Ctrl-C / SIGTERM only asks the loop to stop after the current step
    (and save it); a second one interrupts at once. Outside the main thread nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if request.requested is not None:
            raise KeyboardInterrupt
        request.requested = signal.Signals(signum).name
        print(f"\npolymodal train: {request.requested} received; stopping after this step (again to stop now)",
              file=sys.stderr)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

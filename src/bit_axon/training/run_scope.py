"""Process-wide settings a training run holds while it runs, and restores after.

Ctrl-C and SIGTERM finish the step in flight, save and stop (a second one aborts), and MLX's
memory limit is the run's ``memory_limit_gb``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx


class StopSignals:
    """``requested`` turns True on the first SIGINT/SIGTERM while ``installed()``; the second raises KeyboardInterrupt."""

    def __init__(self, announce: Callable[[str], None]):
        self.announce = announce  # called with the signal's name on the first signal
        self.requested = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.announce(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers for the duration of the block (only in the main thread, where Python runs them)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """MLX's memory limit (``mx.set_memory_limit``) for the duration of the block; None leaves it alone."""
    previous = None if gigabytes is None else mx.set_memory_limit(int(gigabytes * 1e9))
    try:
        yield
    finally:
        if previous is not None:
            mx.set_memory_limit(previous)

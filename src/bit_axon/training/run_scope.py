"""Process-wide settings a training run holds while it runs, and restores after.

Ctrl-C and SIGTERM finish the step in flight, save and stop; a second one warns, a third aborts
without saving. MLX's memory limit is the run's ``memory_limit_gb``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORT_AT = 3  # the signal that raises KeyboardInterrupt


def stop_message(signal_name: str, count: int) -> str:
    """What the ``count``-th stop signal of a run prints."""
    if count == 1:
        return f"{signal_name}: stopping after this step, then saving a checkpoint (Ctrl-C twice more aborts)."
    if count == ABORT_AT - 1:
        return f"{signal_name} again: one more aborts at once, without saving a checkpoint."
    return f"{signal_name}: aborting without saving."


class StopSignals:
    """``requested`` turns True on the first SIGINT/SIGTERM while ``installed()``; the third raises KeyboardInterrupt.

    Python runs a signal handler only when the main thread gets back to Python code, which a long
    MLX computation delays by the rest of the step. So the messages are printed by a watcher
    thread that the C-level handler wakes at once (``signal.set_wakeup_fd``); the Python handler
    only keeps count, and raises.
    """

    def __init__(self, announce: Callable[[str], None]):
        self.announce = announce  # called with each signal's message, from the watcher thread
        self.requested = False
        self.count = 0  # signals so far
        self._seen = 0  # the watcher's count: Python merges signals that arrive during one C call

    def _handle(self, signum: int, frame: object) -> None:
        self.count = max(self.count + 1, self._seen)
        self.requested = True
        if self.count >= ABORT_AT:
            raise KeyboardInterrupt

    def _watch(self, read_fd: int) -> None:
        while chunk := os.read(read_fd, 64):  # empty once the write end is closed
            for signum in chunk:
                if signum in _SIGNALS:
                    self._seen += 1
                    self.announce(stop_message(signal.Signals(signum).name, self._seen))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers for the duration of the block (only in the main thread, where Python runs them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block
        watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-signals", daemon=True)
        watcher.start()
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)
            watcher.join(timeout=1.0)
            os.close(read_fd)


@contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """MLX's memory limit (``mx.set_memory_limit``) for the duration of the block; None leaves it alone."""
    previous = None if gigabytes is None else mx.set_memory_limit(int(gigabytes * 1e9))
    try:
        yield
    finally:
        if previous is not None:
            mx.set_memory_limit(previous)

"""The interface every temperature source implements."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

# Readings outside this range are sensor placeholders (0, -127, 255...) rather than temperatures.
PLAUSIBLE_RANGE = (1.0, 150.0)

_Closable = TypeVar("_Closable", bound="ClosableSensor")


class SensorError(RuntimeError):
    """A sensor cannot be opened, or a read failed. The message says why, for the user."""


@runtime_checkable
class TemperatureSensor(Protocol):
    """A source of one temperature in °C: the hottest relevant point of the chip doing the training.

    ``read()`` returns the current reading, or raises ``SensorError``. Sources that hold OS
    resources may also define ``close()``; ``ThermalMonitor.stop()`` calls it when present.
    """

    name: str

    def read(self) -> float: ...


def plausible(value: float) -> bool:
    return PLAUSIBLE_RANGE[0] <= value <= PLAUSIBLE_RANGE[1]


class CommandSensor:
    """Base for sensors that run one command per read and parse what it prints.

    ``run`` is injectable so parsing is tested on recorded output. ``tool`` names the command in
    error messages; ``error_stream`` is where it explains a failure (stdout or stderr).
    """

    tool = "command"
    error_stream = "stderr"

    def __init__(
        self,
        command: Sequence[str],
        name: str,
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
        timeout: float = 10.0,
    ):
        self.command = list(command)
        self.name = name
        self._run = run
        self._timeout = timeout

    def output(self) -> str:
        """The command's stdout; ``SensorError`` when it cannot start, times out or exits non-zero."""
        try:
            done = self._run(self.command, capture_output=True, text=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise SensorError(f"{self.tool} failed: {err}") from err
        if done.returncode != 0:
            why = getattr(done, self.error_stream).strip()[:200]
            raise SensorError(f"{self.tool} exited {done.returncode}: {why}")
        return done.stdout


class ClosableSensor:
    """Base for sensors holding an OS resource, released once by the ``close`` callable they are given."""

    def __init__(self, name: str, close: Callable[[], None] | None = None):
        self.name = name
        self._close = close

    def read(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def checked(self: _Closable) -> _Closable:
        """This sensor after one successful read; closed, and the error raised, when the read fails."""
        try:
            self.read()
        except SensorError:
            self.close()
            raise
        return self

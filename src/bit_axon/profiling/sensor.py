"""The interface every temperature source implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Readings outside this range are sensor placeholders (0, -127, 255...) rather than temperatures.
PLAUSIBLE_RANGE = (1.0, 150.0)


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

"""Background temperature polling, with the sensor picked for the machine.

``detect_sensor()`` tries, in order:

* macOS: ``powermetrics`` (only when root needs no password prompt), then the IOKit HID die
  sensors (no root);
* MLX CUDA backend in use: the training GPU via NVML, then ``nvidia-smi``; then the Linux CPU sensors;
* Linux: CPU package / SoC sensors from ``/sys/class/thermal`` and ``/sys/class/hwmon``.

When nothing works it returns None, and ``ThermalMonitor`` warns once that thermal protection is
off; training goes on with ``temperature`` always None.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bit_axon.profiling.macos import HIDTemperatureSensor, PowermetricsSensor
from bit_axon.profiling.nvidia import NvidiaSmiSensor, NvmlSensor
from bit_axon.profiling.sensor import SensorError, TemperatureSensor
from bit_axon.profiling.sysfs import SysfsSensor

logger = logging.getLogger(__name__)


def mlx_uses_cuda() -> bool:
    """True when MLX's CUDA backend is installed and sees a GPU (then the GPU is what heats up)."""
    try:
        import mlx.core as mx
    except ImportError:
        return False
    cuda = getattr(mx, "cuda", None)  # absent in MLX builds older than the CUDA backend
    return bool(cuda is not None and cuda.is_available())


def detect_sensor(
    *,
    platform: str | None = None,
    sysfs_root: str | Path = "/sys",
    prefer_gpu: bool | None = None,
    tried: list[str] | None = None,
) -> TemperatureSensor | None:
    """The first working temperature sensor for this machine, or None.

    ``prefer_gpu`` None means "if MLX trains on CUDA". Each failed candidate's reason is logged at
    debug level and appended to ``tried`` when given.
    """
    platform = platform or sys.platform
    candidates: list[tuple[str, Callable[[], TemperatureSensor]]] = []
    if platform == "darwin":
        candidates += [
            ("powermetrics", PowermetricsSensor.detect),
            ("IOKit HID", HIDTemperatureSensor.detect),
        ]
    elif platform.startswith("linux"):
        if mlx_uses_cuda() if prefer_gpu is None else prefer_gpu:
            candidates += [("NVML", NvmlSensor.detect), ("nvidia-smi", NvidiaSmiSensor.detect)]
        candidates.append(("sysfs", lambda: SysfsSensor.detect(sysfs_root)))
    reasons = tried if tried is not None else []
    if not candidates:
        reasons.append(f"no temperature sensors supported on {platform}")
    for label, make in candidates:
        try:
            sensor = make()
        except SensorError as err:
            reasons.append(f"{label}: {err}")
            logger.debug("temperature sensor %s unavailable: %s", label, err)
            continue
        logger.info("Thermal monitoring with %s", sensor.name)
        return sensor
    return None


class ThermalMonitor:
    """Polls a temperature sensor every ``poll_interval`` seconds in a daemon thread.

    ``temperature`` is the latest reading in °C, or None when there is no sensor or the last read
    failed; ``history`` holds the last ``history_size`` (time, °C) readings, times from ``clock``.
    ``start()`` takes one reading synchronously so the first training step already sees it;
    ``stop()`` releases the sensor, so a stopped monitor cannot be started again.
    """

    def __init__(
        self,
        poll_interval: float = 1.0,
        source: TemperatureSensor | None = None,
        history_size: int = 3600,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if source is None:
            tried: list[str] = []
            source = detect_sensor(tried=tried)
            if source is None:
                logger.warning(
                    "No temperature sensor found (%s): thermal protection is OFF and training will not "
                    "pause or stop when the machine gets hot. Pass --no-thermal to silence this.",
                    "; ".join(tried),
                )
        self.source = source
        self.poll_interval = poll_interval
        self._clock = clock
        self._history: deque[tuple[float, float]] = deque(maxlen=history_size)
        self._latest: float | None = None
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def temperature(self) -> float | None:
        return self._latest

    @property
    def history(self) -> deque[tuple[float, float]]:
        with self._lock:
            return deque(self._history, maxlen=self._history.maxlen)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> float | None:
        """Read the sensor now, record and return the reading (None on failure or without sensor)."""
        if self.source is None:
            return None
        try:
            value = float(self.source.read())
        except SensorError as err:
            if not self._failing:  # once per outage, not once per second
                logger.warning(
                    "Temperature sensor %s failed (%s); temperature unknown until it recovers",
                    self.source.name,
                    err,
                )
            self._failing = True
            self._latest = None
            return None
        if self._failing:
            logger.info("Temperature sensor %s recovered: %.1f°C", self.source.name, value)
            self._failing = False
        with self._lock:
            self._history.append((self._clock(), value))
            self._latest = value
        return value

    def start(self) -> ThermalMonitor:
        if self._closed:
            raise RuntimeError("this ThermalMonitor was stopped and its sensor released; create a new one")
        if self.source is None or self.running:
            return self
        self.poll()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bit-axon-thermal", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_interval))
            self._thread = None
        close = getattr(self.source, "close", None)
        if close is not None and not self._closed:
            close()
        self._closed = True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll()
            except Exception:  # a bug in a sensor must not end protection silently
                logger.exception(
                    "Thermal monitor crashed; thermal protection is OFF for the rest of this run"
                )
                self._latest = None
                return

    def __enter__(self) -> ThermalMonitor:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

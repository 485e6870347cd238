"""Thermal policy for training: slow down when warm, pause when hot, stop when critical.

Trainer hooks (one ``CoolingScheduler`` per run, ``None`` when thermal control is off; the
trainer calls them from its ``Cooling`` callback, ``bit_axon.training.callbacks``)::

    for step in ...:
        cooling.check_before_step(step)   # may sleep (pause); raises ThermalShutdownError
        t0 = time.perf_counter()
        ...one optimizer step, mx.eval(...)...
        cooling.after_step(time.perf_counter() - t0)   # may sleep a cool-down gap

On ``ThermalShutdownError`` the trainer saves a checkpoint first, then re-raises to stop the run;
``cooling.status()`` gives the temperature, tier and time spent cooling for progress bars and
metrics, and ``cooling.close()`` stops the monitor at the end of training.

Tiers (``ThermalPolicy``), on the latest reading ``T`` from the monitor:

* ``T < max_speed_temp``: normal, full speed.
* ``max_speed_temp <= T < pause_temp``: warm. ``after_step`` sleeps a cool-down gap after each
  step, so the duty cycle drops until the temperature settles just below ``pause_temp`` instead
  of sawing around it with pauses. The batch size stays as it is: a smaller batch would change
  the packed batches and the data position, and a resumed run would no longer repeat the
  uninterrupted one. ``should_reduce_batch()`` is True here, for callers that want the signal;
  the trainer does not consult it.
* ``T >= pause_temp``: hot. ``check_before_step`` sleeps in ``pause_duration`` slices, re-reading
  the temperature, until it is below ``pause_temp``.
* ``T >= stop_temp``: critical. ``ThermalShutdownError``, also when reached during a pause.

A reading of None (no sensor, or a failed read) is "unknown": it never pauses, slows or stops.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Protocol

from bit_axon.profiling.thermal import ThermalMonitor

logger = logging.getLogger(__name__)


class ThermalTier(str, Enum):
    UNKNOWN = "unknown"
    NORMAL = "normal"
    WARM = "warm"
    HOT = "hot"
    CRITICAL = "critical"


class ThermalShutdownError(RuntimeError):
    """The chip reached ``stop_temp``: save a checkpoint and stop training."""

    def __init__(self, temperature: float, stop_temp: float, step: int):
        super().__init__(
            f"Temperature {temperature:.1f}°C reached the stop threshold {stop_temp:.1f}°C at step {step}; "
            "stopping training to protect the machine"
        )
        self.temperature = temperature
        self.stop_temp = stop_temp
        self.step = step


@dataclass(frozen=True)
class ThermalPolicy:
    """Temperature thresholds (°C), pause slice and polling period (s); see the module docstring for the tiers."""

    max_speed_temp: float = 75.0  # °C: warm zone (reduce batch, cool-down gaps) from here
    pause_temp: float = 85.0  # °C: pause training at or above
    stop_temp: float = 95.0  # °C: stop training at or above
    pause_duration: float = 0.5  # s: sleep slice while paused
    # Duty-cycle control in the warm zone; cooldown_gain=0 gives the plain pause-only policy.
    cooldown_gain: float = 1.0  # initial gap/step ratio at pause_temp; adapted while training
    cooldown_margin: float = 1.0  # °C below pause_temp to hold; at most half the warm zone
    poll_interval: float = 1.0  # s: between temperature reads (the monitor's polling period)

    def __post_init__(self) -> None:
        if not self.max_speed_temp < self.pause_temp < self.stop_temp:
            raise ValueError(
                "need max_speed_temp < pause_temp < stop_temp, got "
                f"{self.max_speed_temp} / {self.pause_temp} / {self.stop_temp}"
            )
        if self.pause_duration <= 0:
            raise ValueError(f"pause_duration must be > 0, got {self.pause_duration}")
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {self.poll_interval}")
        if self.cooldown_gain < 0:
            raise ValueError(f"cooldown_gain must be >= 0, got {self.cooldown_gain}")
        if self.cooldown_margin < 0:
            raise ValueError(f"cooldown_margin must be >= 0, got {self.cooldown_margin}")

    @property
    def cooldown_target(self) -> float:
        """The temperature the warm-zone controller holds."""
        return self.pause_temp - min(self.cooldown_margin, (self.pause_temp - self.max_speed_temp) / 2)

    def tier(self, temperature: float | None) -> ThermalTier:
        if temperature is None:
            return ThermalTier.UNKNOWN
        if temperature >= self.stop_temp:
            return ThermalTier.CRITICAL
        if temperature >= self.pause_temp:
            return ThermalTier.HOT
        if temperature >= self.max_speed_temp:
            return ThermalTier.WARM
        return ThermalTier.NORMAL


class DutyCycleController:
    """Cool-down gap after a step: ``gap = step_seconds * k * x``.

    ``x`` is how far into the warm zone the temperature is (0 at ``max_speed_temp``, 1 at
    ``pause_temp``), so the gap grows smoothly as the chip heats. A fixed ``k`` would settle at a
    plant-dependent temperature (too cool and slow, or hot enough to pause), so ``k`` is adapted
    multiplicatively, like an integral term, to hold the temperature at ``policy.cooldown_target``:
    it grows while the reading is above that target (and in jumps whenever training had to pause,
    the failure it exists to prevent) and shrinks while below.
    """

    # Tuned on bench/thermal_sim.py: faster adaptation oscillates on a die with a ~10 s time constant
    # read once a second; slower takes minutes to settle.
    ADAPT_RATE = 0.1  # per second, per warm-zone width of error
    PAUSE_BOOST = 1.5  # k multiplier for every pause
    MIN_GAIN, MAX_GAIN = 0.02, 20.0
    MAX_GAP_RATIO = 8.0  # never idle more than 8x the step time (duty cycle >= 11%)

    def __init__(self, policy: ThermalPolicy):
        self.policy = policy
        self.gain = policy.cooldown_gain

    @property
    def enabled(self) -> bool:
        return self.policy.cooldown_gain > 0

    def gap(self, step_seconds: float, temperature: float | None) -> float:
        """Seconds to idle after a step of ``step_seconds`` ending at ``temperature``."""
        p = self.policy
        if not self.enabled or temperature is None or temperature < p.max_speed_temp:
            return 0.0
        x = min(1.0, (temperature - p.max_speed_temp) / (p.pause_temp - p.max_speed_temp))
        return step_seconds * min(self.gain * x, self.MAX_GAP_RATIO)

    def observe(self, temperature: float | None, seconds: float) -> None:
        """Adapt ``k`` to ``seconds`` spent at ``temperature`` (warm zone and above only)."""
        p = self.policy
        if not self.enabled or temperature is None or temperature < p.max_speed_temp:
            return
        error = (temperature - p.cooldown_target) / (p.pause_temp - p.max_speed_temp)
        # Scaled by elapsed time, so adaptation speed does not depend on how long steps are.
        self._scale(math.exp(self.ADAPT_RATE * error * seconds))

    def paused(self) -> None:
        if self.enabled:
            self._scale(self.PAUSE_BOOST)

    def _scale(self, factor: float) -> None:
        self.gain = min(self.MAX_GAIN, max(self.MIN_GAIN, self.gain * factor))


class TemperatureReader(Protocol):
    """What the scheduler needs from a monitor: ``ThermalMonitor`` or a fake."""

    @property
    def temperature(self) -> float | None: ...


class CoolingScheduler:
    """Applies a ``ThermalPolicy`` around training steps; see the module docstring for the hooks."""

    def __init__(
        self,
        monitor: TemperatureReader,
        policy: ThermalPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.monitor = monitor
        self.policy = policy or ThermalPolicy()
        self.controller = DutyCycleController(self.policy)
        self._sleep = sleep
        self._clock = clock
        self._total_pause = 0.0
        self._total_cooldown = 0.0
        self._warned_warm = False
        self._pauses = 0

    @property
    def temperature(self) -> float | None:
        return self.monitor.temperature

    @property
    def tier(self) -> ThermalTier:
        return self.policy.tier(self.temperature)

    @property
    def total_pause_time(self) -> float:
        """Seconds spent paused at or above ``pause_temp``."""
        return self._total_pause

    @property
    def total_cooldown_time(self) -> float:
        """Seconds spent in warm-zone cool-down gaps."""
        return self._total_cooldown

    def should_reduce_batch(self) -> bool:
        """True at or above ``max_speed_temp``. Informational: the trainer never changes its batch size
        (exact resume and the packing depend on it); its warm-tier action is ``after_step``'s gap."""
        return self.tier in (ThermalTier.WARM, ThermalTier.HOT, ThermalTier.CRITICAL)

    def check_before_step(self, step: int) -> ThermalTier:
        """Pause while hot, raise ``ThermalShutdownError`` when critical; return the tier to train in."""
        temperature = self.temperature
        tier = self.policy.tier(temperature)
        if tier is ThermalTier.CRITICAL:
            raise ThermalShutdownError(temperature, self.policy.stop_temp, step)
        if tier is not ThermalTier.HOT:
            return tier
        # Pause-only policies pause every few seconds when hot: warn the first time, then debug.
        log = logger.debug if self._pauses else logger.warning
        log(
            "%.1f°C >= %.1f°C at step %d: pausing training until it cools down%s",
            temperature,
            self.policy.pause_temp,
            step,
            "" if self._pauses else " (further pauses are logged at debug level)",
        )
        self._pauses += 1
        self.controller.paused()
        start = self._clock()
        try:
            while tier is ThermalTier.HOT:
                self._sleep(self.policy.pause_duration)
                temperature = self.temperature
                tier = self.policy.tier(temperature)
                if tier is ThermalTier.CRITICAL:
                    raise ThermalShutdownError(temperature, self.policy.stop_temp, step)
        finally:
            paused = self._clock() - start
            self._total_pause += paused
        if tier is ThermalTier.UNKNOWN:
            logger.warning("Temperature unknown while paused; resuming training at step %d", step)
        else:
            logger.debug("Resuming training at %.1f°C after a %.1fs pause", temperature, paused)
        return tier

    def after_step(self, step_seconds: float) -> float:
        """Sleep a cool-down gap when warm; return the seconds slept (0 outside the warm zone)."""
        if step_seconds < 0:
            raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
        temperature = self.temperature
        gap = self.controller.gap(step_seconds, temperature)
        self.controller.observe(temperature, step_seconds + gap)
        if gap <= 0:
            return 0.0
        if not self._warned_warm:
            logger.info(
                "Warm (%.1f°C >= %.1f°C): adding cool-down gaps between steps to stay below %.1f°C",
                temperature,
                self.policy.max_speed_temp,
                self.policy.pause_temp,
            )
            self._warned_warm = True
        start = self._clock()
        self._sleep(gap)
        slept = self._clock() - start
        self._total_cooldown += slept
        return slept

    def status(self) -> dict[str, float | int | str | None]:
        """Current state for progress bars and metrics."""
        return {
            "temperature": self.temperature,
            "tier": self.tier.value,
            "total_pause_time": self._total_pause,
            "total_cooldown_time": self._total_cooldown,
            "pauses": self._pauses,
            "cooldown_gain": self.controller.gain,
        }

    def restore_totals(self, state: dict[str, Any]) -> None:
        """Carry pause/cool-down totals over from a checkpoint's state, so a resumed run reports all of it."""
        self._total_pause = float(state.get("total_pause_time") or 0.0)
        self._total_cooldown = float(state.get("total_cooldown_time") or 0.0)
        self._pauses = int(state.get("pauses") or 0)

    def close(self) -> None:
        """Stop the monitor's polling thread, if it has one."""
        stop = getattr(self.monitor, "stop", None)
        if stop is not None:
            stop()

    def __enter__(self) -> CoolingScheduler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def build_cooling_scheduler(
    enabled: bool, policy: ThermalPolicy, poll_interval: float | None = None
) -> CoolingScheduler | None:
    """The scheduler the CLI hands to the trainer, with a started monitor; None when off.

    The monitor polls every ``poll_interval`` seconds, by default ``policy.poll_interval``.

    ``enabled=False`` (``--no-thermal``) returns None silently. Without a working sensor the
    monitor logs one warning that thermal protection is off, and this returns None.
    """
    if not enabled:
        logger.debug("Thermal monitoring disabled")
        return None
    monitor = ThermalMonitor(poll_interval=policy.poll_interval if poll_interval is None else poll_interval)
    if monitor.source is None:
        return None
    return CoolingScheduler(monitor.start(), policy)

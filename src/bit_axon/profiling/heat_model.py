"""A simulated chip for testing thermal control without hardware or real time.

First-order lumped model: ``C dT/dt = P * duty - k (T - T_ambient)``, solved exactly over each
interval of constant duty, on its own clock. ``HeatModelSensor`` samples it every
``poll_interval`` simulated seconds and holds the value, as ``ThermalMonitor`` does with a real
sensor, so controllers see the same staleness they would in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class HeatModel:
    power: float = 22.0  # W drawn while a training step runs (idle draw is folded into ambient)
    conductance: float = 0.3  # W/°C from die to ambient
    capacity: float = 3.0  # J/°C; time constant capacity/conductance = 10 s, like an SoC die
    ambient: float = 25.0  # °C
    temperature: float = 25.0  # °C, current
    sample_interval: float = 1.0  # s between sensor samples (ThermalMonitor's poll_interval)
    hot_threshold: float | None = None  # track the time spent at or above this temperature
    time: float = field(init=False, default=0.0)  # simulated seconds
    sample: float = field(init=False)  # the reading taken at the latest sample tick
    max_temperature: float = field(init=False)
    time_hot: float = field(init=False, default=0.0)
    _integral: float = field(init=False, default=0.0)
    _next_sample: float = field(init=False)

    def __post_init__(self) -> None:
        if min(self.power, self.conductance, self.capacity, self.sample_interval) <= 0:
            raise ValueError("power, conductance, capacity and sample_interval must be positive")
        self.max_temperature = self.sample = self.temperature
        self._next_sample = self.sample_interval

    @property
    def time_constant(self) -> float:
        return self.capacity / self.conductance

    def steady_state(self, duty: float) -> float:
        return self.ambient + self.power * duty / self.conductance

    @property
    def mean_temperature(self) -> float:
        """Time-weighted mean temperature so far."""
        return self._integral / self.time if self.time > 0 else self.temperature

    def advance(self, seconds: float, duty: float) -> None:
        """Run ``seconds`` at ``duty`` (0 idle .. 1 full load), sampling at every tick passed."""
        if seconds < 0 or not 0.0 <= duty <= 1.0:
            raise ValueError(f"need seconds >= 0 and 0 <= duty <= 1, got {seconds}, {duty}")
        end = self.time + seconds
        while self._next_sample <= end:
            self._evolve(self._next_sample - self.time, duty)
            self.sample = self.temperature
            self._next_sample += self.sample_interval
        self._evolve(end - self.time, duty)

    def _evolve(self, seconds: float, duty: float) -> None:
        tau, t0, t_inf = self.time_constant, self.temperature, self.steady_state(duty)
        decay = math.exp(-seconds / tau)
        t1 = t_inf + (t0 - t_inf) * decay
        self._integral += t_inf * seconds + (t0 - t_inf) * tau * (1.0 - decay)
        self.time_hot += self._time_at_or_above(t0, t1, t_inf, seconds)
        self.temperature, self.time = t1, self.time + seconds
        self.max_temperature = max(self.max_temperature, t1)  # T is monotonic within an interval

    def _time_at_or_above(self, t0: float, t1: float, t_inf: float, seconds: float) -> float:
        hot = self.hot_threshold
        if hot is None or (t0 < hot and t1 < hot):
            return 0.0
        if t0 >= hot and t1 >= hot:
            return seconds
        crossing = self.time_constant * math.log((t0 - t_inf) / (hot - t_inf))  # solves T(t) = hot
        return seconds - crossing if t1 >= hot else crossing

    def work(self, seconds: float) -> None:
        self.advance(seconds, 1.0)

    def sleep(self, seconds: float) -> None:
        self.advance(seconds, 0.0)

    def clock(self) -> float:
        return self.time


class HeatModelSensor:
    """A fake sensor on a ``HeatModel``: the reading at its latest sample tick.

    Usable as a ``ThermalMonitor`` source (``read()``) or directly as the monitor a
    ``CoolingScheduler`` reads (``temperature``).
    """

    def __init__(self, model: HeatModel):
        self.model = model
        self.name = "heat model"

    def read(self) -> float:
        return self.model.sample

    @property
    def temperature(self) -> float:
        return self.model.sample


class TrainingHooks(Protocol):
    def check_before_step(self, step: int) -> object: ...

    def after_step(self, step_seconds: float) -> float: ...


@dataclass(frozen=True)
class SimulationResult:
    steps: int
    seconds: float
    max_temperature: float
    mean_temperature: float
    time_hot: float  # simulated seconds at or above the model's hot_threshold

    @property
    def throughput(self) -> float:
        """Training steps per simulated second."""
        return self.steps / self.seconds


def simulate_training(
    model: HeatModel, hooks: TrainingHooks, step_seconds: float, duration: float
) -> SimulationResult:
    """Train on the model for ``duration`` simulated seconds the way the trainer does.

    ``hooks`` (a ``CoolingScheduler`` built with ``sleep=model.sleep, clock=model.clock``) is
    called around each step; each step runs the chip at full load for ``step_seconds``.
    """
    steps = 0
    while model.time < duration:
        hooks.check_before_step(steps)
        model.work(step_seconds)
        hooks.after_step(step_seconds)
        steps += 1
    return SimulationResult(steps, model.time, model.max_temperature, model.mean_temperature, model.time_hot)

import logging
import math

from bit_axon.profiling.heat_model import HeatModel, HeatModelSensor, simulate_training
from bit_axon.training.cooling import (
    CoolingScheduler,
    DutyCycleController,
    ThermalPolicy,
    ThermalShutdownError,
    ThermalTier,
)

import pytest


class FakeClock:
    """Injected clock + sleep: sleeping only advances time."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class CurveMonitor:
    """A monitor whose temperature follows a function of the fake clock's time."""

    def __init__(self, clock: FakeClock, curve):
        self.clock, self.curve = clock, curve
        self.stopped = False

    @property
    def temperature(self):
        return self.curve(self.clock.now)

    def stop(self):
        self.stopped = True


def scheduler_at(temperature, policy=None):
    clock = FakeClock()
    return CoolingScheduler(
        CurveMonitor(clock, lambda t: temperature), policy, sleep=clock.sleep, clock=clock
    ), clock


# --- policy -----------------------------------------------------------------------------------------


def test_policy_defaults_match_the_guide():
    p = ThermalPolicy()
    assert (p.max_speed_temp, p.pause_temp, p.stop_temp, p.pause_duration) == (75.0, 85.0, 95.0, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_speed_temp": 85.0},
        {"pause_temp": 95.0},
        {"pause_temp": 70.0},
        {"stop_temp": 80.0},
        {"pause_duration": 0.0},
        {"cooldown_gain": -1.0},
        {"cooldown_margin": -1.0},
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        ThermalPolicy(**kwargs)


def test_cooldown_target_stays_inside_a_narrow_warm_zone():
    assert ThermalPolicy().cooldown_target == 84.0
    assert ThermalPolicy(max_speed_temp=79.0, pause_temp=80.0, stop_temp=90.0).cooldown_target == 79.5


@pytest.mark.parametrize(
    ("temperature", "tier", "reduce"),
    [
        (None, ThermalTier.UNKNOWN, False),
        (40.0, ThermalTier.NORMAL, False),
        (74.9, ThermalTier.NORMAL, False),
        (75.0, ThermalTier.WARM, True),
        (84.9, ThermalTier.WARM, True),
        (85.0, ThermalTier.HOT, True),
        (94.9, ThermalTier.HOT, True),
        (95.0, ThermalTier.CRITICAL, True),
    ],
)
def test_tier_boundaries(temperature, tier, reduce):
    assert ThermalPolicy().tier(temperature) is tier
    scheduler, _ = scheduler_at(temperature)
    assert scheduler.tier is tier and scheduler.should_reduce_batch() is reduce


# --- check_before_step ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [None, 40.0, 74.9, 75.0, 84.9])
def test_no_pause_below_pause_temp(temperature):
    scheduler, clock = scheduler_at(temperature)
    assert scheduler.check_before_step(7) is ThermalPolicy().tier(temperature)
    assert clock.sleeps == [] and scheduler.total_pause_time == 0.0


@pytest.mark.parametrize("start", [85.0, 94.9])
def test_pause_until_below_pause_temp_then_resume(start):
    clock = FakeClock()
    cooling = CurveMonitor(clock, lambda t: start - 2.0 * t)  # cools 2 °C/s while paused
    scheduler = CoolingScheduler(cooling, ThermalPolicy(), sleep=clock.sleep, clock=clock)
    tier = scheduler.check_before_step(3)
    expected = 0.5 * math.floor((start - 85.0) / 2.0 / 0.5 + 1)  # first 0.5 s slice reading < 85
    assert tier is ThermalTier.WARM
    assert clock.sleeps == [0.5] * round(expected / 0.5)
    assert scheduler.temperature < 85.0
    assert scheduler.total_pause_time == pytest.approx(expected)
    scheduler.check_before_step(4)  # now below: no further pause
    assert scheduler.total_pause_time == pytest.approx(expected)
    assert scheduler.status()["pauses"] == 1


def test_pause_accumulates_and_logs_once(caplog):
    clock = FakeClock()
    # Hot at whole seconds 0 and 10, cool otherwise.
    monitor = CurveMonitor(clock, lambda t: 86.0 if t in (0.0, 10.0) else 80.0)
    scheduler = CoolingScheduler(monitor, ThermalPolicy(cooldown_gain=0.0), sleep=clock.sleep, clock=clock)
    with caplog.at_level(logging.INFO, logger="bit_axon.training.cooling"):
        scheduler.check_before_step(0)
        clock.now = 10.0
        scheduler.check_before_step(1)
    assert scheduler.total_pause_time == pytest.approx(1.0)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_stop_temp_raises_immediately():
    scheduler, clock = scheduler_at(95.0)
    with pytest.raises(ThermalShutdownError) as err:
        scheduler.check_before_step(12)
    assert clock.sleeps == [] and err.value.step == 12 and err.value.temperature == 95.0


def test_stop_raised_while_paused():
    clock = FakeClock()
    heating = CurveMonitor(clock, lambda t: 86.0 + 3.0 * t)  # keeps heating while idle: 95 at t=3
    scheduler = CoolingScheduler(heating, ThermalPolicy(), sleep=clock.sleep, clock=clock)
    with pytest.raises(ThermalShutdownError, match="stop threshold 95.0") as err:
        scheduler.check_before_step(5)
    assert err.value.temperature >= 95.0 and err.value.step == 5
    assert scheduler.total_pause_time == pytest.approx(3.0)  # the pause is still accounted


def test_sensor_lost_during_pause_resumes(caplog):
    clock = FakeClock()
    monitor = CurveMonitor(clock, lambda t: 88.0 if t < 1.0 else None)
    scheduler = CoolingScheduler(monitor, ThermalPolicy(), sleep=clock.sleep, clock=clock)
    assert scheduler.check_before_step(0) is ThermalTier.UNKNOWN
    assert scheduler.total_pause_time == pytest.approx(1.0)
    assert any("unknown" in r.getMessage() for r in caplog.records)


def test_unknown_temperature_never_slows_pauses_or_stops():
    scheduler, clock = scheduler_at(None)
    for step in range(100):
        assert scheduler.check_before_step(step) is ThermalTier.UNKNOWN
        assert scheduler.after_step(1.0) == 0.0
    assert clock.sleeps == [] and scheduler.status()["temperature"] is None


# --- after_step: duty-cycle control -----------------------------------------------------------------


def test_no_gap_below_max_speed_temp():
    scheduler, clock = scheduler_at(74.9)
    assert scheduler.after_step(2.0) == 0.0 and clock.sleeps == []


def test_warm_gap_is_proportional_to_step_and_depth_into_warm_zone():
    gaps = {}
    for temperature in (75.0, 80.0, 84.0):
        for step in (1.0, 2.0):
            scheduler, clock = scheduler_at(temperature)
            gaps[temperature, step] = scheduler.after_step(step)
            assert clock.sleeps == ([gaps[temperature, step]] if gaps[temperature, step] else [])
            assert scheduler.total_cooldown_time == pytest.approx(gaps[temperature, step])
    assert gaps[75.0, 1.0] == 0.0
    assert gaps[80.0, 1.0] == pytest.approx(0.5)  # initial k=1, halfway into the warm zone
    assert gaps[80.0, 2.0] == pytest.approx(2 * gaps[80.0, 1.0])
    assert gaps[84.0, 1.0] > gaps[80.0, 1.0]


def test_pause_only_policy_has_no_gaps():
    scheduler, clock = scheduler_at(84.0, ThermalPolicy(cooldown_gain=0.0))
    assert scheduler.after_step(1.0) == 0.0 and clock.sleeps == []


def test_controller_gain_adapts_toward_the_target():
    policy = ThermalPolicy()  # target 84 °C
    above, below = DutyCycleController(policy), DutyCycleController(policy)
    for _ in range(20):
        above.observe(84.8, 1.0)
        below.observe(78.0, 1.0)
    assert above.gain > policy.cooldown_gain > below.gain
    before = below.gain
    below.observe(60.0, 100.0)  # outside the warm zone: no change
    below.observe(None, 100.0)
    assert below.gain == before
    below.paused()
    assert below.gain == pytest.approx(before * DutyCycleController.PAUSE_BOOST)


def test_status_and_close():
    scheduler, _ = scheduler_at(80.0)
    scheduler.after_step(1.0)
    status = scheduler.status()
    assert status["temperature"] == 80.0 and status["tier"] == "warm"
    assert status["total_cooldown_time"] == pytest.approx(0.5) and status["total_pause_time"] == 0.0
    with scheduler:
        pass
    assert scheduler.monitor.stopped


# --- against the simulated chip ---------------------------------------------------------------------


def simulate(policy: ThermalPolicy, step_seconds: float, minutes: float = 30.0):
    model = HeatModel(hot_threshold=policy.pause_temp)  # fast die: time constant 10 s, 98 °C at full load
    scheduler = CoolingScheduler(HeatModelSensor(model), policy, sleep=model.sleep, clock=model.clock)
    return simulate_training(model, scheduler, step_seconds, minutes * 60), scheduler


@pytest.mark.parametrize("step_seconds", [0.25, 0.5])
def test_duty_cycle_stays_below_pause_with_higher_throughput(step_seconds):
    pause_only, pause_sched = simulate(ThermalPolicy(cooldown_gain=0.0), step_seconds)
    duty, duty_sched = simulate(ThermalPolicy(), step_seconds)
    # Pause-only saws around the threshold: it exceeds it and stalls for whole pause slices.
    assert pause_only.max_temperature > 85.0 and pause_sched.status()["pauses"] > 100
    # Duty-cycle control settles below it, never pauses...
    assert duty.max_temperature < 85.0 and duty.time_hot == 0.0
    assert duty_sched.total_pause_time == 0.0 and duty_sched.total_cooldown_time > 0.0
    # ...and, with short steps on a fast die, trains more steps per simulated second.
    assert duty.throughput > pause_only.throughput * 1.005


def test_duty_cycle_holds_long_steps_on_a_slow_package_below_pause():
    # Time constant 60 s, 4 s steps: here pause-only is ~2% faster but spends ~40% of the time >= 85 °C.
    policy = ThermalPolicy()
    model = HeatModel(capacity=18.0, hot_threshold=policy.pause_temp)
    scheduler = CoolingScheduler(HeatModelSensor(model), policy, sleep=model.sleep, clock=model.clock)
    result = simulate_training(model, scheduler, step_seconds=4.0, duration=3600.0)
    assert result.max_temperature < 86.0 and result.time_hot / result.seconds < 0.01

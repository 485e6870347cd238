import math

from bit_axon.profiling.heat_model import HeatModel, HeatModelSensor

import pytest


def euler(model: HeatModel, seconds: float, duty: float, dt: float = 1e-4) -> float:
    t = model.temperature
    for _ in range(round(seconds / dt)):
        t += dt * (model.power * duty - model.conductance * (t - model.ambient)) / model.capacity
    return t


@pytest.mark.parametrize(("seconds", "duty"), [(0.3, 1.0), (2.0, 0.0), (5.0, 0.6)])
def test_exact_step_matches_the_ode(seconds, duty):
    model = HeatModel(temperature=70.0)
    expected = euler(model, seconds, duty)
    model.advance(seconds, duty)
    assert model.temperature == pytest.approx(expected, abs=1e-3)


def test_converges_to_steady_state_and_tracks_mean_and_max():
    model = HeatModel()
    model.work(200.0)  # 20 time constants
    assert model.temperature == pytest.approx(model.steady_state(1.0)) == pytest.approx(25 + 22 / 0.3)
    assert model.max_temperature == pytest.approx(model.temperature)
    assert model.ambient < model.mean_temperature < model.temperature
    model.sleep(200.0)
    assert model.temperature == pytest.approx(25.0, abs=1e-6) and model.time == 400.0


def test_time_at_or_above_threshold_is_exact():
    model = HeatModel(temperature=25.0, hot_threshold=80.0)
    model.work(30.0)  # crosses 80 once: T(t) = 98.3 - 73.3 e^{-t/10}
    t_cross = 10.0 * math.log((25.0 - model.steady_state(1.0)) / (80.0 - model.steady_state(1.0)))
    assert model.time_hot == pytest.approx(30.0 - t_cross)
    model.sleep(100.0)  # cools below again
    assert 30.0 - t_cross < model.time_hot < 30.0 - t_cross + 10.0


def test_sensor_samples_at_ticks_and_holds():
    model = HeatModel(sample_interval=1.0)
    sensor = HeatModelSensor(model)
    model.work(0.9)
    assert sensor.temperature == 25.0  # no tick yet: still the initial sample
    model.work(0.2)  # tick at t=1.0
    at_tick = HeatModel()
    at_tick.work(1.0)
    assert sensor.read() == pytest.approx(at_tick.temperature)
    assert sensor.temperature < model.temperature


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        HeatModel(capacity=0.0)
    with pytest.raises(ValueError):
        HeatModel().advance(1.0, 1.5)

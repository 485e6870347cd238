"""Pause-only (the guide's policy) against warm-zone duty-cycle control, on a simulated chip.

Runs ``CoolingScheduler`` on ``HeatModel`` (first-order, sensor sampled once a second) in
simulated time, so it takes well under a second, and prints throughput (steps per simulated
second) and temperatures per regime.

    python bench/thermal_sim.py
    python bench/thermal_sim.py --time-constant 60 --step-seconds 2 --minutes 60
"""

from __future__ import annotations

import argparse
import logging

from bit_axon.profiling.heat_model import HeatModel, HeatModelSensor, SimulationResult, simulate_training
from bit_axon.training.cooling import CoolingScheduler, ThermalPolicy

# (label, die time constant s, step seconds)
REGIMES = [
    ("fast die, short steps", 10.0, 0.5),
    ("fast die, long steps", 10.0, 4.0),
    ("slow package, 1 s steps", 60.0, 1.0),
]


def run(policy: ThermalPolicy, time_constant: float, step_seconds: float, seconds: float, power: float):
    model = HeatModel(
        power=power, capacity=0.3 * time_constant, conductance=0.3, hot_threshold=policy.pause_temp
    )
    scheduler = CoolingScheduler(HeatModelSensor(model), policy, sleep=model.sleep, clock=model.clock)
    return simulate_training(model, scheduler, step_seconds, seconds), scheduler


def row(name: str, result: SimulationResult, scheduler: CoolingScheduler) -> str:
    return (
        f"  {name:<12} {result.throughput:8.4f} {result.mean_temperature:7.2f} {result.max_temperature:7.2f} "
        f"{result.time_hot / result.seconds:8.1%} {scheduler.status()['pauses']:7d} "
        f"{scheduler.total_pause_time:8.1f} {scheduler.total_cooldown_time:9.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated training time")
    parser.add_argument(
        "--power", type=float, default=22.0, help="W at full load (0.3 W/°C to a 25°C ambient)"
    )
    parser.add_argument("--time-constant", type=float, help="run one regime with this die time constant (s)")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="step time for --time-constant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the pause-only policy would log a pause every few seconds

    regimes = REGIMES if args.time_constant is None else [("custom", args.time_constant, args.step_seconds)]
    pause_only, duty_cycle = ThermalPolicy(cooldown_gain=0.0), ThermalPolicy()
    print(
        f"{args.minutes:g} simulated minutes, {args.power:g} W at full load -> "
        f"{HeatModel(power=args.power).steady_state(1.0):.0f}°C steady state; pause at {duty_cycle.pause_temp:g}°C"
    )
    for label, tau, step in regimes:
        print(f"\n{label}: time constant {tau:g} s, step {step:g} s")
        print(
            f"  {'policy':<12} {'steps/s':>8} {'mean°C':>7} {'max°C':>7} {'>=pause':>8} {'pauses':>7} {'paused s':>8} {'cooldown s':>9}"
        )
        base, base_s = run(pause_only, tau, step, args.minutes * 60, args.power)
        duty, duty_s = run(duty_cycle, tau, step, args.minutes * 60, args.power)
        print(row("pause-only", base, base_s))
        print(row("duty-cycle", duty, duty_s))
        print(f"  throughput duty-cycle vs pause-only: {duty.throughput / base.throughput - 1:+.1%}")


if __name__ == "__main__":
    main()

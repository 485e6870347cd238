"""Machine telemetry for training: chip temperature (``thermal``) and a simulated chip (``heat_model``)."""

from bit_axon.profiling.sensor import SensorError, TemperatureSensor
from bit_axon.profiling.thermal import ThermalMonitor, detect_sensor

__all__ = ["SensorError", "TemperatureSensor", "ThermalMonitor", "detect_sensor"]

"""NVIDIA GPU temperature: NVML (``pynvml`` if installed, else ctypes), or ``nvidia-smi`` output.

The GPU read is the one MLX's CUDA backend trains on: the first entry of ``CUDA_VISIBLE_DEVICES``
(an index or a ``GPU-`` UUID), else GPU 0. NVML numbers GPUs in PCI order, as CUDA does with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``; on machines where the orders differ, use a UUID.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable

from bit_axon.profiling.sensor import ClosableSensor, CommandSensor, SensorError, plausible

NVIDIA_SMI_COMMAND = ("nvidia-smi", "--query-gpu=temperature.gpu", "--format=csv,noheader")
_NVML_TEMPERATURE_GPU = 0


def cuda_device_selector() -> str:
    """The NVML/nvidia-smi id of the GPU CUDA calls device 0 in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def parse_nvidia_smi(text: str) -> list[float]:
    """Temperatures, one per GPU line, from ``nvidia-smi --query-gpu=temperature.gpu --format=csv,noheader``."""
    values = []
    for line in text.splitlines():
        field = line.strip().split(",")[0].strip()
        try:
            value = float(field)
        except ValueError:  # "[N/A]", "[Not Supported]", blank lines
            continue
        if plausible(value):
            values.append(value)
    return values


def _pynvml_reader(selector: str) -> tuple[Callable[[], float], Callable[[], None]]:
    import pynvml  # nvidia-ml-py

    try:
        pynvml.nvmlInit()
        if selector.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(selector))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(selector)
    except pynvml.NVMLError as err:
        raise SensorError(f"NVML (pynvml): {err}") from err

    def read() -> float:
        try:
            return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except pynvml.NVMLError as err:
            raise SensorError(f"NVML (pynvml): {err}") from err

    return read, pynvml.nvmlShutdown


def _ctypes_nvml_reader(selector: str) -> tuple[Callable[[], float], Callable[[], None]]:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.nvmlErrorString.restype = ctypes.c_char_p
        lib.nvmlErrorString.argtypes = [ctypes.c_int]
        init, shutdown = lib.nvmlInit_v2, lib.nvmlShutdown
        by_index, by_uuid = lib.nvmlDeviceGetHandleByIndex_v2, lib.nvmlDeviceGetHandleByUUID
        get_temperature = lib.nvmlDeviceGetTemperature
    except (OSError, AttributeError) as err:
        raise SensorError(f"libnvidia-ml.so.1 unavailable: {err}") from err

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise SensorError(f"NVML {what}: {lib.nvmlErrorString(rc).decode(errors='replace')}")

    check(init(), "nvmlInit_v2")
    handle = ctypes.c_void_p()
    if selector.isdigit():
        check(by_index(ctypes.c_uint(int(selector)), ctypes.byref(handle)), "nvmlDeviceGetHandleByIndex_v2")
    else:
        check(by_uuid(selector.encode(), ctypes.byref(handle)), "nvmlDeviceGetHandleByUUID")

    def read() -> float:
        value = ctypes.c_uint()
        check(get_temperature(handle, _NVML_TEMPERATURE_GPU, ctypes.byref(value)), "nvmlDeviceGetTemperature")
        return float(value.value)

    return read, shutdown


class NvmlSensor(ClosableSensor):
    """GPU core temperature through NVML: cheap enough to poll every second."""

    def __init__(self, read: Callable[[], float], close: Callable[[], None] | None, name: str):
        super().__init__(name, close)
        self._read = read

    @classmethod
    def detect(cls, selector: str | None = None) -> NvmlSensor:
        selector = selector or cuda_device_selector()
        try:
            read, close = _pynvml_reader(selector)
            binding = "pynvml"
        except ImportError:
            read, close = _ctypes_nvml_reader(selector)
            binding = "libnvidia-ml"
        return cls(read, close, f"NVML GPU {selector} ({binding})").checked()

    def read(self) -> float:
        value = self._read()
        if not plausible(value):
            raise SensorError(f"implausible GPU temperature {value}")
        return value


class NvidiaSmiSensor(CommandSensor):
    """Fallback when NVML cannot be loaded in-process: one ``nvidia-smi`` run per read."""

    tool = "nvidia-smi"
    error_stream = "stdout"  # nvidia-smi prints its errors ("No devices were found") on stdout

    def __init__(
        self,
        selector: str,
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
        timeout: float = 10.0,
    ):
        super().__init__([*NVIDIA_SMI_COMMAND, "-i", selector], f"nvidia-smi GPU {selector}", run, timeout)

    @classmethod
    def detect(cls, selector: str | None = None) -> NvidiaSmiSensor:
        if shutil.which("nvidia-smi") is None:
            raise SensorError("nvidia-smi not found")
        sensor = cls(selector or cuda_device_selector())
        sensor.read()
        return sensor

    def read(self) -> float:
        stdout = self.output()
        values = parse_nvidia_smi(stdout)
        if not values:
            raise SensorError(f"nvidia-smi printed no temperature: {stdout.strip()[:200]!r}")
        return max(values)

import logging
import subprocess
import sys
import time
import types
from pathlib import Path

from bit_axon.profiling import macos, nvidia, thermal
from bit_axon.profiling.macos import (
    HIDTemperatureSensor,
    PowermetricsSensor,
    aggregate_hid_temperatures,
    parse_powermetrics,
)
from bit_axon.profiling.nvidia import NvidiaSmiSensor, NvmlSensor, cuda_device_selector, parse_nvidia_smi
from bit_axon.profiling.sensor import SensorError
from bit_axon.profiling.sysfs import SysfsSensor, find_sysfs_probes, rank_hwmon, rank_thermal_zone
from bit_axon.profiling.thermal import ThermalMonitor, detect_sensor
from bit_axon.training.cooling import ThermalPolicy, build_cooling_scheduler

import pytest

# `sudo powermetrics --samplers smc -n 1` on an Intel MacBook Pro (header trimmed).
POWERMETRICS_INTEL = """\
Machine model: MacBookPro15,1
OS version: 19H2

*** Sampled system activity (Tue Nov  3 14:03:11 2020 +0100) (251.32ms elapsed) ***


**** SMC sensors ****

CPU Thermal level: 0
GPU Thermal level: 0
IO Thermal level: 0
Fan: 2156.43 rpm
CPU die temperature: 71.94 C
GPU die temperature: 64.00 C
CPU Plimit: 0.00
GPU Plimit (Int): 0.00
Number of prochots: 0
"""

# Apple Silicon: only a pressure level, no die temperature.
POWERMETRICS_APPLE_SILICON = """\
*** Sampled system activity (Wed Jan 10 10:00:00 2024 +0000) (250.11ms elapsed) ***

**** Thermal pressure ****

Current pressure level: Nominal
"""

# IOKit HID temperature services on an M2 MacBook Air ("Product" -> °C).
HID_M2 = {
    "PMU tdie1": 47.3,
    "PMU tdie2": 52.8,
    "PMU tdie3": -127.0,  # idle placeholder
    "PMU tdie5": 0.0,  # idle placeholder
    "PMU tdev1": 38.2,
    "PMU tcal": 51.9,
    "NAND CH0 temp": 60.0,
    "gas gauge battery": 30.1,
}
HID_M1 = {
    "pACC MTR Temp Sensor2": 55.0,
    "eACC MTR Temp Sensor0": 44.5,
    "SOC MTR Temp Sensor0": 49.0,
    "PMU tcal": 51.9,
}


def completed(stdout: str, returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args=[], returncode=returncode, stdout=stdout, stderr=stderr)


# --- macOS ------------------------------------------------------------------------------------------


def test_parse_powermetrics_takes_hottest_die():
    assert parse_powermetrics(POWERMETRICS_INTEL) == pytest.approx(71.94)
    assert parse_powermetrics(POWERMETRICS_INTEL.replace("64.00", "80.50")) == pytest.approx(80.5)
    assert parse_powermetrics(POWERMETRICS_APPLE_SILICON) is None
    assert parse_powermetrics("") is None


def test_powermetrics_sensor_runs_and_parses():
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return completed(POWERMETRICS_INTEL)

    sensor = PowermetricsSensor(("sudo", "-n"), run=run)
    assert sensor.read() == pytest.approx(71.94)
    assert calls[0][:3] == ["sudo", "-n", "powermetrics"] and "smc" in calls[0]
    with pytest.raises(SensorError, match="no die temperature"):
        PowermetricsSensor(run=lambda cmd, **kw: completed(POWERMETRICS_APPLE_SILICON)).read()
    with pytest.raises(SensorError, match="exited 1"):
        PowermetricsSensor(run=lambda cmd, **kw: completed("", 1, "must be invoked as the superuser")).read()


def test_root_check_never_prompts(monkeypatch):
    monkeypatch.setattr(macos.os, "geteuid", lambda: 0)
    assert macos.root_command_prefix() == ()
    monkeypatch.setattr(macos.os, "geteuid", lambda: 501)
    monkeypatch.setattr(macos.shutil, "which", lambda name: "/usr/bin/sudo")
    seen = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        return completed("", returncode=1, stderr="sudo: a password is required")

    monkeypatch.setattr(macos.subprocess, "run", run)
    assert macos.root_command_prefix() is None
    assert seen == [["sudo", "-n", "true"]]  # -n: fail instead of prompting
    monkeypatch.setattr(macos.subprocess, "run", lambda cmd, **kw: completed(""))
    assert macos.root_command_prefix() == ("sudo", "-n")


def test_powermetrics_without_root_says_so(monkeypatch, caplog):
    monkeypatch.setattr(macos.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(macos, "root_command_prefix", lambda: None)
    with caplog.at_level(logging.INFO), pytest.raises(SensorError, match="needs root"):
        PowermetricsSensor.detect()
    assert [r.levelno for r in caplog.records if "needs root" in r.getMessage()] == [logging.INFO]


def test_hid_aggregation_uses_hottest_die_sensor():
    assert aggregate_hid_temperatures(HID_M2) == pytest.approx(52.8)  # not NAND (60), not tcal
    assert aggregate_hid_temperatures(HID_M1) == pytest.approx(55.0)
    no_die = {k: v for k, v in HID_M2.items() if "tdie" not in k}
    assert aggregate_hid_temperatures(no_die) == pytest.approx(38.2)  # other PMU points, never tcal
    assert aggregate_hid_temperatures({"gas gauge battery": 30.1, "NAND CH0 temp": 40.0}) is None
    assert aggregate_hid_temperatures({}) is None


def test_hid_sensor_reads_through_injected_reader():
    closed = []
    sensor = HIDTemperatureSensor(lambda: HID_M1, lambda: closed.append(True))
    assert sensor.read() == pytest.approx(55.0)
    sensor.close()
    sensor.close()
    assert closed == [True]
    with pytest.raises(SensorError, match="no SoC die sensor"):
        HIDTemperatureSensor(lambda: {"gas gauge battery": 30.0}).read()


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS guard")
def test_hid_sensor_is_not_loaded_off_macos():
    with pytest.raises(SensorError, match="only on macOS"):
        HIDTemperatureSensor.detect()


# --- NVIDIA -----------------------------------------------------------------------------------------


def test_parse_nvidia_smi():
    assert parse_nvidia_smi("41\n") == [41.0]
    assert parse_nvidia_smi("41\n[N/A]\n\n67\n") == [41.0, 67.0]
    assert parse_nvidia_smi("[Not Supported]\n") == []


def test_nvidia_smi_sensor_queries_the_training_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert cuda_device_selector() == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a2f, GPU-99")
    assert cuda_device_selector() == "GPU-8a2f"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_device_selector() == "0"

    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return completed("63\n")

    assert NvidiaSmiSensor("1", run=run).read() == 63.0
    assert calls == [["nvidia-smi", "--query-gpu=temperature.gpu", "--format=csv,noheader", "-i", "1"]]
    with pytest.raises(SensorError, match="no temperature"):
        NvidiaSmiSensor("0", run=lambda cmd, **kw: completed("[N/A]\n")).read()
    with pytest.raises(SensorError, match="exited 6"):
        NvidiaSmiSensor("0", run=lambda cmd, **kw: completed("No devices were found", 6)).read()


def test_nvml_prefers_pynvml(monkeypatch):
    fake = types.SimpleNamespace(
        NVMLError=type("NVMLError", (Exception,), {}),
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: shutdowns.append(True),
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetHandleByUUID=lambda u: ("handle", u),
        nvmlDeviceGetTemperature=lambda h, kind: 71 if h == ("handle", 3) else 0,
    )
    shutdowns: list[bool] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sensor = NvmlSensor.detect("3")
    assert sensor.read() == 71.0 and "pynvml" in sensor.name
    sensor.close()
    assert shutdowns == [True]


def test_nvml_without_library_is_a_sensor_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails -> ctypes path

    def no_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(nvidia.ctypes, "CDLL", no_library)
    with pytest.raises(SensorError, match="libnvidia-ml.so.1 unavailable"):
        NvmlSensor.detect("0")


# --- Linux sysfs ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def zone(root: Path, index: int, kind: str, millideg: str) -> None:
    write(root / f"class/thermal/thermal_zone{index}/type", kind)
    write(root / f"class/thermal/thermal_zone{index}/temp", millideg)


def hwmon(root: Path, index: int, chip: str, temps: dict[str, str]) -> None:
    write(root / f"class/hwmon/hwmon{index}/name", chip)
    for i, (label, millideg) in enumerate(temps.items(), start=1):
        write(root / f"class/hwmon/hwmon{index}/temp{i}_input", millideg)
        if label:
            write(root / f"class/hwmon/hwmon{index}/temp{i}_label", label)


@pytest.mark.parametrize(
    ("kind", "rank"),
    [("x86_pkg_temp", 0), ("cpu-thermal", 1), ("soc_thermal", 1), ("acpitz", 3), ("iwlwifi_1", None)],
)
def test_thermal_zone_ranks(kind, rank):
    assert rank_thermal_zone(kind) == rank


@pytest.mark.parametrize(
    ("chip", "label", "rank"),
    [
        ("coretemp", "Package id 0", 0),
        ("coretemp", "Core 3", 2),
        ("k10temp", "Tdie", 0),
        ("k10temp", "Tctl", 1),
        ("k10temp", "", 1),
        ("k10temp", "Tccd1", 2),
        ("cpu_thermal", "", 1),
        ("nvme", "Composite", None),
        ("amdgpu", "edge", None),
    ],
)
def test_hwmon_ranks(chip, label, rank):
    assert rank_hwmon(chip, label) == rank


def test_sysfs_prefers_package_sensors_and_takes_the_hottest(tmp_path):
    zone(tmp_path, 0, "acpitz", "45000")
    zone(tmp_path, 1, "x86_pkg_temp", "62000")
    hwmon(tmp_path, 0, "nvme", {"Composite": "70000"})  # hotter, but not the CPU
    hwmon(tmp_path, 1, "coretemp", {"Package id 0": "61000", "Core 0": "66000", "Package id 1": "64500"})
    sensor = SysfsSensor.detect(tmp_path)
    assert {p.rank for p in sensor.probes} == {0} and len(sensor.probes) == 3
    assert sensor.read() == pytest.approx(64.5)
    assert "nvme" not in sensor.name
    ranks = [p.rank for p in find_sysfs_probes(tmp_path)]
    assert ranks == sorted(ranks) and 3 in ranks


def test_sysfs_falls_back_down_the_ranking(tmp_path):
    zone(tmp_path, 0, "acpitz", "45000")
    hwmon(tmp_path, 0, "k10temp", {"Tctl": "71000", "Tccd1": "69000"})
    assert SysfsSensor.detect(tmp_path).read() == pytest.approx(71.0)
    hwmon(tmp_path, 0, "k10temp", {"Tctl": "71000", "Tccd1": "69000", "Tdie": "61000"})
    assert SysfsSensor.detect(tmp_path).read() == pytest.approx(61.0)  # Tdie: Tctl may carry an offset


def test_sysfs_skips_unreadable_and_placeholder_sensors(tmp_path):
    zone(tmp_path, 0, "x86_pkg_temp", "garbage")
    zone(tmp_path, 1, "cpu-thermal", "0")  # placeholder
    zone(tmp_path, 2, "acpitz", "48000")
    sensor = SysfsSensor.detect(tmp_path)
    assert sensor.read() == pytest.approx(48.0) and "acpitz" in sensor.name


def test_sysfs_without_cpu_sensors(tmp_path):
    hwmon(tmp_path, 0, "nvme", {"Composite": "40000"})
    with pytest.raises(SensorError, match="no readable CPU/SoC sensor"):
        SysfsSensor.detect(tmp_path)
    with pytest.raises(SensorError):
        SysfsSensor.detect(tmp_path / "missing")


# --- detection --------------------------------------------------------------------------------------


def failing(reason: str):
    def detect(*args, **kwargs):
        raise SensorError(reason)

    return detect


def test_detect_linux_uses_sysfs(tmp_path):
    zone(tmp_path, 0, "x86_pkg_temp", "55000")
    sensor = detect_sensor(platform="linux", sysfs_root=tmp_path, prefer_gpu=False)
    assert isinstance(sensor, SysfsSensor) and sensor.read() == 55.0


def test_detect_prefers_gpu_on_cuda_and_falls_back(tmp_path, monkeypatch):
    zone(tmp_path, 0, "x86_pkg_temp", "55000")
    gpu = NvidiaSmiSensor("0", run=lambda cmd, **kw: completed("66\n"))
    monkeypatch.setattr(NvmlSensor, "detect", failing("NVML Shared Library Not Found"))
    monkeypatch.setattr(NvidiaSmiSensor, "detect", lambda *a, **k: gpu)
    assert detect_sensor(platform="linux", sysfs_root=tmp_path, prefer_gpu=True) is gpu
    monkeypatch.setattr(thermal, "mlx_uses_cuda", lambda: True)
    assert detect_sensor(platform="linux", sysfs_root=tmp_path) is gpu  # auto: MLX trains on CUDA
    monkeypatch.setattr(NvidiaSmiSensor, "detect", failing("nvidia-smi not found"))
    tried: list[str] = []
    sensor = detect_sensor(platform="linux", sysfs_root=tmp_path, prefer_gpu=True, tried=tried)
    assert isinstance(sensor, SysfsSensor)
    assert tried == ["NVML: NVML Shared Library Not Found", "nvidia-smi: nvidia-smi not found"]


def test_detect_macos_order(monkeypatch):
    hid = HIDTemperatureSensor(lambda: HID_M1)
    monkeypatch.setattr(PowermetricsSensor, "detect", failing("powermetrics needs root"))
    monkeypatch.setattr(HIDTemperatureSensor, "detect", lambda: hid)
    assert detect_sensor(platform="darwin") is hid
    monkeypatch.setattr(HIDTemperatureSensor, "detect", failing("IOKit HID unavailable"))
    tried: list[str] = []
    assert detect_sensor(platform="darwin", tried=tried) is None
    assert tried == ["powermetrics: powermetrics needs root", "IOKit HID: IOKit HID unavailable"]


def test_detect_unsupported_platform():
    tried: list[str] = []
    assert detect_sensor(platform="win32", tried=tried) is None
    assert tried == ["no temperature sensors supported on win32"]


# --- monitor ----------------------------------------------------------------------------------------


class FakeSensor:
    name = "fake"

    def __init__(self, values):
        self.values = list(values)
        self.closed = 0

    def read(self) -> float:
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        self.closed += 1


def wait_for(condition, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_monitor_polls_in_background_and_records_history():
    slow = FakeSensor([40.0, 41.0])
    with ThermalMonitor(poll_interval=60.0, source=slow) as monitor:
        assert monitor.temperature == 40.0  # start() reads synchronously, before the thread's first wait
    sensor = FakeSensor([50.0, 51.0, 52.0, 53.0])
    with ThermalMonitor(poll_interval=0.001, source=sensor, history_size=3) as monitor:
        wait_for(lambda: monitor.temperature == 53.0)
        assert monitor.running
        history = monitor.history
        assert len(history) == 3 and history.maxlen == 3
        assert [t for t, _ in history] == sorted(t for t, _ in history)
    assert not monitor.running and sensor.closed == 1
    with pytest.raises(RuntimeError, match="stopped"):
        monitor.start()


def test_monitor_failed_reads_are_unknown_and_logged_once_per_outage(caplog):
    sensor = FakeSensor([60.0, SensorError("gone"), SensorError("gone"), SensorError("gone"), 61.0])
    monitor = ThermalMonitor(poll_interval=1.0, source=sensor)
    with caplog.at_level(logging.INFO, logger="bit_axon.profiling.thermal"):
        assert monitor.poll() == 60.0
        assert [monitor.poll() for _ in range(3)] == [None, None, None]
        assert monitor.temperature is None
        assert monitor.poll() == 61.0 and monitor.temperature == 61.0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed" in m for m in messages) == 1 and sum("recovered" in m for m in messages) == 1
    assert [v for _, v in monitor.history] == [60.0, 61.0]


def test_monitor_thread_crash_turns_protection_off_loudly(caplog):
    sensor = FakeSensor([70.0, ZeroDivisionError("bug")])
    monitor = ThermalMonitor(poll_interval=0.001, source=sensor).start()
    wait_for(lambda: not monitor.running)
    assert monitor.temperature is None
    assert any("crashed" in r.getMessage() and r.exc_info for r in caplog.records)
    monitor.stop()


def test_no_sensor_warns_exactly_once(monkeypatch, caplog):
    monkeypatch.setattr(thermal, "detect_sensor", lambda **kw: kw["tried"].append("sysfs: nothing") or None)
    with caplog.at_level(logging.DEBUG):
        monitor = ThermalMonitor(poll_interval=0.001)
        monitor.start()
        assert monitor.poll() is None and monitor.temperature is None and not monitor.running
        monitor.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert (
        "thermal protection is OFF" in warnings[0].getMessage()
        and "sysfs: nothing" in warnings[0].getMessage()
    )


def test_factory_without_sensor_warns_once_and_disabled_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(thermal, "detect_sensor", lambda **kw: None)
    with caplog.at_level(logging.INFO):
        assert build_cooling_scheduler(True, ThermalPolicy()) is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    caplog.clear()
    detected = []
    monkeypatch.setattr(thermal, "detect_sensor", lambda **kw: detected.append(True))
    with caplog.at_level(logging.INFO):
        assert build_cooling_scheduler(False, ThermalPolicy()) is None
    assert caplog.records == [] and detected == []


def test_factory_starts_monitor_and_close_stops_it(monkeypatch):
    sensor = FakeSensor([66.0])
    monkeypatch.setattr(thermal, "detect_sensor", lambda **kw: sensor)
    scheduler = build_cooling_scheduler(True, ThermalPolicy(), poll_interval=0.001)
    assert scheduler is not None and scheduler.temperature == 66.0 and scheduler.monitor.running
    scheduler.close()
    assert not scheduler.monitor.running and sensor.closed == 1

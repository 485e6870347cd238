"""Linux CPU/SoC temperature from sysfs: thermal zones and hwmon chips.

Boards expose many sensors (NVMe, Wi-Fi, battery, chipset); only the ones that measure the CPU
package or SoC matter for training, so each one gets a rank and the best-ranked group is read.
A group can hold several sensors (one per socket or CCD); the sensor reports the hottest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bit_axon.profiling.sensor import SensorError, plausible

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SysfsProbe:
    path: Path  # a file holding millidegrees Celsius
    label: str  # what the kernel calls it, for messages
    rank: int  # 0 is best


def rank_thermal_zone(zone_type: str) -> int | None:
    """Rank a ``/sys/class/thermal/thermal_zone*`` by its ``type``; None = not a CPU/SoC sensor."""
    t = zone_type.strip().lower()
    if t == "x86_pkg_temp":
        return 0
    if "cpu" in t or "soc" in t:  # cpu-thermal, cpu_thermal, cpu0-thermal, soc_thermal, ...
        return 1
    if t == "acpitz":  # firmware zone: often near the CPU, but not on it
        return 3
    return None


def rank_hwmon(chip: str, label: str) -> int | None:
    """Rank a ``/sys/class/hwmon/*/temp*_input`` by chip ``name`` and ``temp*_label``."""
    chip, label = chip.strip().lower(), label.strip().lower()
    if chip == "coretemp":
        return 0 if label.startswith("package id") else 2
    if chip in ("k10temp", "zenpower"):
        if label == "tdie":
            return 0
        # Tctl is the control temperature; some Ryzen parts report it with a +10..+20 °C offset.
        return 1 if label in ("tctl", "") else 2
    if "cpu" in chip or "soc" in chip:
        return 1
    if chip == "acpitz":
        return 3
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def find_sysfs_probes(sysfs_root: str | Path = "/sys") -> list[SysfsProbe]:
    """All CPU/SoC temperature files under ``sysfs_root``, best rank first."""
    root = Path(sysfs_root)
    probes: list[SysfsProbe] = []
    for zone in sorted(root.glob("class/thermal/thermal_zone*")):
        zone_type = _read_text(zone / "type")
        rank = rank_thermal_zone(zone_type)
        if rank is not None and (zone / "temp").exists():
            probes.append(SysfsProbe(zone / "temp", f"{zone_type} ({zone.name})", rank))
    for chip_dir in sorted(root.glob("class/hwmon/hwmon*")):
        # Older kernels keep the chip name under device/.
        chip = _read_text(chip_dir / "name") or _read_text(chip_dir / "device" / "name")
        for temp_input in sorted(chip_dir.glob("temp*_input")):
            label = _read_text(temp_input.with_name(temp_input.name.replace("_input", "_label")))
            rank = rank_hwmon(chip, label)
            if rank is not None:
                what = f"{chip} {label}".strip()
                probes.append(SysfsProbe(temp_input, f"{what} ({chip_dir.name}/{temp_input.name})", rank))
    return sorted(probes, key=lambda p: p.rank)


def read_millidegrees(path: Path) -> float:
    try:
        return int(path.read_text().strip()) / 1000.0
    except (OSError, ValueError) as err:
        raise SensorError(f"cannot read {path}: {err}") from err


class SysfsSensor:
    """The hottest of the best-ranked working sysfs CPU/SoC sensors."""

    def __init__(self, probes: list[SysfsProbe]):
        if not probes:
            raise SensorError("no sysfs probes given")
        self.probes = probes
        self.name = "sysfs " + ", ".join(p.label for p in probes)

    @classmethod
    def detect(cls, sysfs_root: str | Path = "/sys") -> SysfsSensor:
        probes = find_sysfs_probes(sysfs_root)
        working = []
        for probe in probes:
            try:
                ok = plausible(read_millidegrees(probe.path))
            except SensorError as err:
                logger.debug("skipping %s: %s", probe.label, err)
                continue
            if ok:
                working.append(probe)
        if not working:
            found = ", ".join(p.label for p in probes) or "none"
            raise SensorError(
                f"no readable CPU/SoC sensor under {sysfs_root}/class/{{thermal,hwmon}} (found: {found})"
            )
        best = working[0].rank
        return cls([p for p in working if p.rank == best])

    def read(self) -> float:
        values, errors = [], []
        for probe in self.probes:
            try:
                value = read_millidegrees(probe.path)
            except SensorError as err:
                errors.append(str(err))
                continue
            if plausible(value):
                values.append(value)
        if not values:
            raise SensorError("; ".join(errors) or f"implausible readings from {self.name}")
        return max(values)

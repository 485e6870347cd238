"""macOS die temperature: ``powermetrics`` (root) or the IOKit HID temperature sensors (no root).

``powermetrics --samplers smc`` prints "CPU die temperature: 52.31 C" lines but only runs as root,
and Apple Silicon's powermetrics has no die temperature at all (its thermal sampler reports a
pressure level). The HID event system that ``macmon`` and ``stats`` read needs no privileges and
covers Apple Silicon, so laptop users are protected without sudo. The ctypes part is kept to
``_IOKitHID``; parsing and aggregation are pure functions, tested on recorded output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping

from bit_axon.profiling.sensor import ClosableSensor, CommandSensor, SensorError, plausible

logger = logging.getLogger(__name__)

POWERMETRICS_COMMAND = ("powermetrics", "--samplers", "smc", "-n", "1", "-i", "250")

_DIE_LINE = re.compile(r"^\s*(?:CPU|GPU|SoC)\s+die temperature:\s*(-?\d+(?:\.\d+)?)\s*C\b", re.M | re.I)


def parse_powermetrics(text: str) -> float | None:
    """Hottest "<CPU|GPU|SoC> die temperature: N C" in powermetrics output, or None."""
    values = [float(m.group(1)) for m in _DIE_LINE.finditer(text)]
    values = [v for v in values if plausible(v)]
    return max(values) if values else None


def root_command_prefix() -> tuple[str, ...] | None:
    """``()`` when running as root, ``("sudo", "-n")`` when sudo needs no password, else None.

    Never prompts: a password prompt from a background thread would hang training.
    """
    if os.geteuid() == 0:
        return ()
    if shutil.which("sudo") is None:
        return None
    try:
        done = subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return ("sudo", "-n") if done.returncode == 0 else None


class PowermetricsSensor(CommandSensor):
    """Runs ``powermetrics`` once per read (about 0.25 s) and parses the die temperature."""

    tool = "powermetrics"

    def __init__(
        self,
        prefix: tuple[str, ...] = (),
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
        timeout: float = 10.0,
    ):
        super().__init__([*prefix, *POWERMETRICS_COMMAND], "powermetrics", run, timeout)

    @classmethod
    def detect(cls) -> PowermetricsSensor:
        if shutil.which("powermetrics") is None:
            raise SensorError("powermetrics not found")
        prefix = root_command_prefix()
        if prefix is None:
            logger.info(
                "powermetrics needs root and sudo would prompt for a password; not asking. "
                "Using the IOKit HID temperature sensors instead (run with sudo to use powermetrics)."
            )
            raise SensorError("powermetrics needs root")
        sensor = cls(prefix)
        sensor.read()  # Apple Silicon has no smc sampler: fail here, not in the training loop
        return sensor

    def read(self) -> float:
        value = parse_powermetrics(self.output())
        if value is None:
            raise SensorError("powermetrics printed no die temperature")
        return value


# Apple Silicon names: "PMU tdie<N>" (SoC die points, M1-M4), "<pACC|eACC|GPU|SOC> MTR Temp Sensor<N>".
_HID_DIE = re.compile(r"^PMU\d* tdie|MTR Temp Sensor")
# Other on-package PMU points ("PMU tdev", "PMU TP3w"); "tcal" is a fixed calibration constant.
_HID_PACKAGE = re.compile(r"^PMU\d* (?!tcal)")


def aggregate_hid_temperatures(readings: Mapping[str, float]) -> float | None:
    """The SoC temperature from HID sensor readings: the hottest die sensor.

    Falls back to other on-package PMU sensors when no die sensor reads; battery, NAND and skin
    sensors are never used. Placeholder values (0, -127) are dropped.
    """
    valid = {name: v for name, v in readings.items() if plausible(v)}
    for pattern in (_HID_DIE, _HID_PACKAGE):
        group = [v for name, v in valid.items() if pattern.search(name)]
        if group:
            return max(group)
    return None


_VP = ctypes.c_void_p
_CF_SIGNATURES = {
    "CFStringCreateWithCString": (_VP, [_VP, ctypes.c_char_p, ctypes.c_uint32]),
    "CFNumberCreate": (_VP, [_VP, ctypes.c_long, _VP]),
    "CFDictionaryCreate": (_VP, [_VP, ctypes.POINTER(_VP), ctypes.POINTER(_VP), ctypes.c_long, _VP, _VP]),
    "CFArrayGetCount": (ctypes.c_long, [_VP]),
    "CFArrayGetValueAtIndex": (_VP, [_VP, ctypes.c_long]),
    "CFStringGetCString": (ctypes.c_bool, [_VP, ctypes.c_char_p, ctypes.c_long, ctypes.c_uint32]),
    "CFRelease": (None, [_VP]),
}
_IOKIT_SIGNATURES = {
    "IOHIDEventSystemClientCreate": (_VP, [_VP]),
    "IOHIDEventSystemClientSetMatching": (ctypes.c_int, [_VP, _VP]),
    "IOHIDEventSystemClientCopyServices": (_VP, [_VP]),
    "IOHIDServiceClientCopyProperty": (_VP, [_VP, _VP]),
    "IOHIDServiceClientCopyEvent": (_VP, [_VP, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64]),
    "IOHIDEventGetFloatValue": (ctypes.c_double, [_VP, ctypes.c_int32]),
}


def _framework(name: str) -> ctypes.CDLL:
    # Since macOS 11 system frameworks live only in the dyld cache; find_library may miss them.
    return ctypes.CDLL(
        ctypes.util.find_library(name) or f"/System/Library/Frameworks/{name}.framework/{name}"
    )


class _IOKitHID:
    """Minimal ctypes binding to the private-but-stable IOHIDEventSystemClient API."""

    _TEMPERATURE_EVENT = 15  # kIOHIDEventTypeTemperature
    _APPLE_VENDOR_PAGE = 0xFF00  # kHIDPage_AppleVendor
    _TEMPERATURE_USAGE = 5  # kHIDUsage_AppleVendor_TemperatureSensor
    _UTF8 = 0x08000100  # kCFStringEncodingUTF8
    _SINT32 = 3  # kCFNumberSInt32Type

    def __init__(self) -> None:
        if sys.platform != "darwin":
            raise SensorError("IOKit HID sensors exist only on macOS")
        cf, io = _framework("CoreFoundation"), _framework("IOKit")
        for lib, signatures in ((cf, _CF_SIGNATURES), (io, _IOKIT_SIGNATURES)):
            for name, (restype, argtypes) in signatures.items():
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
        self._cf, self._io = cf, io

        def cfstr(text: str) -> int:
            return cf.CFStringCreateWithCString(None, text.encode(), self._UTF8)

        def cfint(value: int) -> int:
            return cf.CFNumberCreate(None, self._SINT32, ctypes.byref(ctypes.c_int32(value)))

        keys = (_VP * 2)(cfstr("PrimaryUsagePage"), cfstr("PrimaryUsage"))
        values = (_VP * 2)(cfint(self._APPLE_VENDOR_PAGE), cfint(self._TEMPERATURE_USAGE))
        key_cb = ctypes.addressof(ctypes.c_byte.in_dll(cf, "kCFTypeDictionaryKeyCallBacks"))
        value_cb = ctypes.addressof(ctypes.c_byte.in_dll(cf, "kCFTypeDictionaryValueCallBacks"))
        matching = cf.CFDictionaryCreate(None, keys, values, 2, key_cb, value_cb)
        self._product_key = cfstr("Product")
        for ref in (*keys, *values):
            cf.CFRelease(ref)  # the dictionary retains its own references
        self._client = io.IOHIDEventSystemClientCreate(None)
        if not self._client:
            cf.CFRelease(matching)
            raise SensorError("IOHIDEventSystemClientCreate returned NULL")
        io.IOHIDEventSystemClientSetMatching(self._client, matching)
        cf.CFRelease(matching)

    def read_all(self) -> dict[str, float]:
        """{sensor product name: °C} for every HID temperature sensor."""
        cf, io = self._cf, self._io
        services = io.IOHIDEventSystemClientCopyServices(self._client)
        if not services:
            return {}
        readings: dict[str, float] = {}
        buf = ctypes.create_string_buffer(256)
        try:
            for i in range(cf.CFArrayGetCount(services)):
                service = cf.CFArrayGetValueAtIndex(services, i)
                name_ref = io.IOHIDServiceClientCopyProperty(service, self._product_key)
                if not name_ref:
                    continue
                ok = cf.CFStringGetCString(name_ref, buf, len(buf), self._UTF8)
                cf.CFRelease(name_ref)
                event = io.IOHIDServiceClientCopyEvent(service, self._TEMPERATURE_EVENT, 0, 0) if ok else None
                if not event:
                    continue
                # The temperature lives in the event's base field: IOHIDEventFieldBase(type) = type << 16.
                readings[buf.value.decode(errors="replace")] = io.IOHIDEventGetFloatValue(
                    event, self._TEMPERATURE_EVENT << 16
                )
                cf.CFRelease(event)
        finally:
            cf.CFRelease(services)
        return readings

    def close(self) -> None:
        if self._client:
            self._cf.CFRelease(self._client)
            self._cf.CFRelease(self._product_key)
            self._client = None


class HIDTemperatureSensor(ClosableSensor):
    """Apple SoC die temperature from IOKit HID sensors; no root needed."""

    def __init__(self, read_all: Callable[[], Mapping[str, float]], close: Callable[[], None] | None = None):
        super().__init__("IOKit HID", close)
        self._read_all = read_all

    @classmethod
    def detect(cls) -> HIDTemperatureSensor:
        try:
            hid = _IOKitHID()
        except (OSError, AttributeError, ValueError) as err:  # missing library or symbol
            raise SensorError(f"IOKit HID unavailable: {err}") from err
        return cls(hid.read_all, hid.close).checked()

    def read(self) -> float:
        readings = self._read_all()
        value = aggregate_hid_temperatures(readings)
        if value is None:
            raise SensorError(f"no SoC die sensor among {len(readings)} HID temperature sensors")
        return value

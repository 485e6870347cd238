"""A command's options as a YAML file (``bit-axon train --config run.yaml``), read as strictly as its flags.

The keys are the options' names in snake_case; each value must already have the option's type
(an int for an int option: ``"3"`` is refused, not cast), a choice must be one of the option's
choices, ``null`` is allowed where the option may be None. A key the command does not take is
refused with the nearest known name. Defaults are not written here: a key the file leaves out is
simply not given, and its owner's default applies.

The same module writes such a file (``write_settings_file``), so the resolved settings a run
records read back into exactly the same values.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from bit_axon.io import atomic_write_text

import yaml


class SettingsFileError(ValueError):
    """A settings file that cannot be used; the message names the file (and the key) and what to do."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader reading floats as YAML 1.2 does: PyYAML takes ``1e-4`` (no dot) for a
    string, which would make the most common way to write a learning rate a type error."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),  # 1e-4, 2.5e3, .5e-2
    list("-+0123456789."),
)


def _kind(value: Any) -> str:
    """What a YAML value is, in YAML's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` as the option typed ``annotation`` takes it; ``TypeError`` (what is wrong) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        (annotation,) = options
    got = f"got {value!r} ({_kind(value)})"
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"must be true or false, {got}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"must be an integer, {got}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"must be a number, {got}")
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = [member.value for member in annotation]
        if isinstance(value, str) and value in choices:
            return annotation(value).value
        raise TypeError(f"must be one of {', '.join(choices)}, {got}")
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
        if isinstance(value, str):
            return value if annotation is str else annotation(value)
        raise TypeError(f"must be a string, {got}")
    raise TypeError(f"has a type ({annotation!r}) a settings file cannot hold")


def read_settings_file(path: Path, annotations: Mapping[str, Any], refused: Mapping[str, str] = {}) -> dict[str, Any]:
    """``{key: value}`` of the YAML mapping in ``path``, every key one of ``annotations`` and its
    value coerced to that type. ``refused`` maps keys that look like settings but must not be in a
    file to the reason (``resume``: it is about one invocation, not the run's settings)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsFileError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsFileError(f"--config {path}: cannot read it ({err})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise SettingsFileError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsFileError(f"{path}: expected a mapping of settings (key: value lines), got {_kind(data)}")
    out = {}
    for key, value in data.items():
        if key in refused:
            raise SettingsFileError(f"{path}: {key}: {refused[key]}")
        if key not in annotations:
            close = difflib.get_close_matches(str(key), list(annotations), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingsFileError(f"{path}: unknown setting {key!r}{hint}")
        try:
            out[key] = coerce(value, annotations[key])
        except TypeError as err:
            raise SettingsFileError(f"{path}: {key}: {err}") from None
    return out


def write_settings_file(path: Path, settings: Mapping[str, Any], header: str) -> None:
    """``settings`` (plain values, paths, enums) as YAML at ``path`` (atomically), ``header`` as a comment."""
    plain = {k: str(v) if isinstance(v, PurePath) else v.value if isinstance(v, Enum) else v for k, v in settings.items()}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comment + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))

"""Command-line options derived from where the settings live, so no command restates a default.

``settings_options(cls, flags)`` gives a command one option per field of the dataclass ``cls``: the
field's name as the flag (``lora_rank`` -> ``--lora-rank``), its type, its default shown in
``--help``. ``given_settings`` then keeps the options the user actually passed, as field values, for
``cls(**...)`` to override its own defaults. ``parameter_defaults`` reads a function's defaults,
for options that stand for that function's arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line (name, default and type come from the setting)."""

    help: str
    short: str | None = None
    # A bool setting is a single flag that flips its default: ``--{name}`` for False, ``--no-{name}``
    # for True, unless named here (``use_dora`` is the guide's ``--no-dora``).
    name: str | None = None
    choices: tuple[str, ...] | None = None
    show_default: bool = True


def parameter_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    """``{name: default}`` of ``func``'s parameters that have one."""
    return {
        name: p.default for name, p in inspect.signature(func).parameters.items() if p.default is not p.empty
    }


def _flag_name(name: str, default: Any, flag: Flag) -> str:
    if flag.name is not None:
        return flag.name
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if default is True else f"--{dashed}"


def flag_name(cls: type, flags: Mapping[str, Flag], name: str) -> str:
    """The long flag ``settings_options(cls, flags)`` gives field ``name`` (``lora_rank`` ->
    ``--lora-rank``, ``use_dora`` -> ``--no-dora``), for messages that name what the user typed."""
    return _flag_name(name, getattr(cls, name), flags[name])


def _option(name: str, annotation: Any, default: Any, flag: Flag) -> inspect.Parameter:
    decls = [_flag_name(name, default, flag), *([flag.short] if flag.short else [])]
    if annotation is bool:
        option_default: Any = False  # "flag not given"; given_settings turns it into `not default`
    elif flag.choices is not None:
        annotation = Enum(f"{name}_choice", {c: c for c in flag.choices}, type=str)
        option_default = default
    else:
        option_default = default
    option = typer.Option(option_default, *decls, help=flag.help, show_default=flag.show_default)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def settings_options(cls: type, flags: Mapping[str, Flag]) -> Callable[[Command], Command]:
    """Decorator: the command's ``**settings`` become one option per field of ``cls``.

    Every field needs an entry in ``flags`` (its help text), so a new setting cannot go missing
    from ``--help`` unnoticed.
    """
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in flags]
    if missing:
        raise ValueError(f"no command-line flag described for {cls.__name__} field(s) {', '.join(missing)}")
    generated = [_option(f.name, hints[f.name], f.default, flags[f.name]) for f in dataclasses.fields(cls)]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=[*own, *generated])  # type: ignore[attr-defined]
        return command

    return decorate


def given_settings(ctx: typer.Context, cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings passed on the command line, as ``cls`` field values (the rest keep ``cls``'s defaults)."""
    out = {}
    for name, value in settings.items():
        source = ctx.get_parameter_source(name)
        # By name: typer ships its own copy of click, whose ParameterSource is not click's.
        if source is None or source.name == "DEFAULT":
            continue
        default = getattr(cls, name)
        if isinstance(default, bool):
            value = not default
        elif isinstance(value, Enum):
            value = value.value
        out[name] = value
    return out

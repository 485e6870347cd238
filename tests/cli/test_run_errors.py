"""How ``train`` and ``distill`` end on the errors they expect: the message and the exit code."""

from __future__ import annotations

import io
from pathlib import Path

from bit_axon.cli.run_errors import THERMAL_STOP_EXIT, RunErrors
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.data import DatasetError

import pytest
import typer
from rich.console import Console


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def test_a_thermal_stop_exits_2_and_names_the_intact_checkpoint_folder():
    con, out = console()
    with pytest.raises(typer.Exit) as stop, RunErrors(con) as errors:
        errors.output_dir = Path("runs/a")
        raise ThermalShutdownError(96.0, 95.0, 12)
    assert stop.value.exit_code == THERMAL_STOP_EXIT == 2
    assert "Thermal stop" in out.getvalue() and "runs/a is intact" in out.getvalue()
    assert "--resume" in out.getvalue()


@pytest.mark.parametrize("error", [FileNotFoundError("data.jsonl: file not found"), ValueError("bad setting"),
                                   DatasetError("data.jsonl line 3: not JSON")])
def test_bad_input_exits_1_with_the_message_on_stderr(error, capsys):
    con, _ = console()
    with pytest.raises(typer.Exit) as stop, RunErrors(con, Path("out")):
        raise error
    assert stop.value.exit_code == 1
    assert capsys.readouterr().err == f"Error: {error}\n"


def test_an_unexpected_error_keeps_its_traceback():
    con, _ = console()
    with pytest.raises(KeyError), RunErrors(con, Path("out")):
        raise KeyError("a bug")

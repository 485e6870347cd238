"""``bit-axon serve``'s checks before anything loads: each mistake named, exit status 2."""

from __future__ import annotations

from bit_axon.cli.main import app

import pytest
from typer.testing import CliRunner

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a MODEL to serve, or --runs DIR"),
        (["m.gguf", "--adapter", "noequals"], "is not NAME=PATH"),
        (["m.gguf", "--adapter", "a=missing.safetensors"], "missing.safetensors: no such adapter file"),
        (["--runs", "no-such-dir"], "no-such-dir: no such directory"),
        (["m.gguf", "--max-batch", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_are_named(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_adapters_without_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["serve", "--runs", ".", "--adapter", "x=a.safetensors"])
    assert result.exit_code == 2 and "adapters need a base MODEL" in " ".join(result.output.split())


def test_a_missing_model_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", "nothing-here"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output

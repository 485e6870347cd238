"""``bit-axon train --config run.yaml``, the checks before any work, exit statuses, ``--version``.

``run_training`` is replaced where the test is about what the command resolves, so these take
milliseconds; the runs that train are in test_train_cli.py.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from bit_axon.cli.main import app
from bit_axon.training.config import TrainingConfig

import pytest
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


@pytest.fixture
def sft(tmp_path) -> Path:
    out = tmp_path / "sft.jsonl"
    out.write_text("".join((EXAMPLES / "sft.jsonl").read_text().splitlines(keepends=True)[:2]))
    return out


@pytest.fixture
def seen(monkeypatch) -> dict:
    """What ``train`` hands ``run_training`` (which does nothing here)."""
    calls: dict = {}

    def fake_run_training(data, config, **kwargs):
        kwargs.pop("console")
        calls.update(data=Path(data), config=config, **kwargs)
        return {"adapter_path": "adapter.safetensors", "step": 0}

    monkeypatch.setattr("bit_axon.cli.train.run_training", fake_run_training)
    return calls


def _train(*args) -> object:
    return runner.invoke(app, ["train", *map(str, args)])


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {expected}"]


def test_a_yaml_file_gives_the_same_settings_as_the_flags(tmp_path, sft, seen):
    out = tmp_path / "out"
    flags = ["--config-small", "--val-data", sft, "--format", "messages", "--lora-rank", "4", "-lr", "1e-4",
             "--no-dora", "--max-steps", "3", "--temp-pause", "70", "--grad-checkpoint", "--quantize-mode", "affine",
             "-o", out, "--no-thermal"]
    assert _train(sft, *flags).exit_code == 0
    by_flags = dict(seen)
    run_yaml = tmp_path / "run.yaml"
    # 1e-4 without a dot: YAML 1.1 reads it as a string; the file reader takes it as the number it is.
    run_yaml.write_text(
        f"data: {sft}\nconfig_small: true\nval_data: {sft}\nformat: messages\nlora_rank: 4\nlearning_rate: 1e-4\n"
        f"use_dora: false\nmax_steps: 3\ntemp_pause: 70\ngrad_checkpoint: true\nquantize_mode: affine\n"
        f"output_dir: {out}\nno_thermal: true\n"
    )
    seen.clear()
    result = _train("--config", run_yaml)
    assert result.exit_code == 0, result.output
    assert seen == by_flags
    assert seen["config"] == TrainingConfig(
        lora_rank=4, learning_rate=1e-4, use_dora=False, max_steps=3, temp_pause=70.0, temp_max_speed=69.0,
        grad_checkpoint=True, quantize_mode="affine", output_dir=str(out), training_mode="sft",
    )


def test_a_flag_overrides_the_file(tmp_path, sft, seen):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"data: {sft}\nconfig_small: true\nlora_rank: 4\nmax_steps: 3\n")
    other = tmp_path / "other.jsonl"
    other.write_text(sft.read_text())
    result = _train(other, "--config", run_yaml, "--lora-rank", "16", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (seen["config"].lora_rank, seen["config"].max_steps, seen["data"]) == (16, 3, other)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lora_rnak: 4\n", "{f}: unknown setting 'lora_rnak'; did you mean lora_rank?"),
        ("no_dora: true\n", "{f}: unknown setting 'no_dora'; did you mean use_dora?"),
        ("max_steps: '3'\n", "{f}: max_steps: must be an integer, got '3' (a string)"),
        ("max_steps: 3.0\n", "{f}: max_steps: must be an integer, got 3.0 (a number)"),
        ("use_dora: 0\n", "{f}: use_dora: must be true or false, got 0 (a number)"),
        ("quantize_mode: gguf\n", "{f}: quantize_mode: must be one of nf4, affine, none, got 'gguf' (a string)"),
        ("lora_rank: -3\n", "{f}: lora_rank: must be a positive integer, got -3"),
        ("warmup_steps: 20\nmax_steps: 10\n", "{f}: warmup_steps: must be between 0 and max_steps (10), got 20"),
        ("temp_pause: 99\ntemp_stop: 90\n",
         "{f}: need temp_max_speed < temp_pause < temp_stop, got 75.0 / 99.0 / 90.0"),
        ("resume: true\n", "{f}: resume: is not a setting of the run; pass --resume on the command line"),
        ("lora_rank: [4\n", "{f}:2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
        ("- lora_rank\n", "{f}: expected a mapping of settings (key: value lines), got a list"),
    ],
)
def test_bad_keys_and_values_in_the_file_are_named(tmp_path, sft, seen, text, expected):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(text)
    _one_line_error(_train(sft, "--config-small", "--config", run_yaml, "-o", tmp_path / "out"),
                    expected.format(f=run_yaml))
    assert seen == {}


def test_a_bad_flag_is_named_as_typed_even_with_a_file(tmp_path, sft, seen):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("lora_rank: 4\n")
    _one_line_error(_train(sft, "--config-small", "--config", run_yaml, "--lora-rank", "-3"),
                    "--lora-rank: must be a positive integer, got -3")
    _one_line_error(_train(sft, "--config-small", "--warmup-steps", "20", "--max-steps", "10"),
                    "--warmup-steps: must be between 0 and --max-steps (10), got 20")


def test_a_missing_settings_file_or_data_is_a_one_line_error(tmp_path, seen):
    _one_line_error(_train("--config", tmp_path / "nope.yaml"), f"--config {tmp_path / 'nope.yaml'}: file not found")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("config_small: true\n")
    _one_line_error(_train("--config", run_yaml), "no training data: give DATA (or `data:` in the --config file)")


def test_resume_without_a_checkpoint_is_refused(tmp_path, sft, seen):
    out = tmp_path / "typo"
    _one_line_error(_train(sft, "--config-small", "-o", out, "--resume"),
                    f"--resume: no checkpoint in {out}. Check the path, or drop --resume to start a new run")
    assert not out.exists() and seen == {}


def test_a_new_run_into_another_runs_checkpoints_is_refused(tmp_path, sft, seen):
    out = tmp_path / "run"
    (out / "step_00000004").mkdir(parents=True)
    _one_line_error(_train(sft, "--config-small", "-o", out),
                    f"--output-dir {out} already holds checkpoints of a run (the newest: step_00000004): pass "
                    "--resume to continue that run, or choose another --output-dir to start a new one")
    assert seen == {}


def test_resume_takes_the_recorded_settings_and_the_flags_given(tmp_path, sft, seen):
    out = tmp_path / "run"
    (out / "step_00000002").mkdir(parents=True)
    (out / "train_config.yaml").write_text(
        f"data: {sft}\nconfig_small: true\nno_thermal: true\nlora_rank: 4\nmax_steps: 2\noutput_dir: {out}\n"
    )
    result = _train("--resume", "-o", out, "--max-steps", "5")
    assert result.exit_code == 0, result.output
    assert f"Settings from {out / 'train_config.yaml'}" in result.output
    assert (seen["config"].lora_rank, seen["config"].max_steps, seen["resume"], seen["thermal"]) == (4, 5, True, False)


def test_a_wrong_model_path_fails_before_any_data_is_read(tmp_path, sft, monkeypatch):
    import bit_axon.training.data

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the data was tokenized before the model path was checked")

    monkeypatch.setattr(bit_axon.training.data, "load_dataset_file", no_tokenizing)
    result = _train(sft, "-w", tmp_path / "no-such-model", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: --model-weights: Model directory not found: {tmp_path / 'no-such-model'}")
    _one_line_error(_train(sft, "--config-small", "--val-data", tmp_path / "val.jsonl"),
                    f"--val-data not found: {tmp_path / 'val.jsonl'}")
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_says_how_to_resume_and_exits_130(tmp_path, sft, monkeypatch):
    out = tmp_path / "my run"
    checkpoint = out / "step_00000003"
    monkeypatch.setattr("bit_axon.cli.train.run_training", lambda data, config, **kw: {
        "step": 3, "interrupted": True, "adapter_path": None, "checkpoint": str(checkpoint)})
    result = runner.invoke(app, ["train", str(sft), "--config-small", "-o", str(out)], terminal_width=40)
    assert result.exit_code == 130, result.output
    # One line however narrow the terminal: the command stays one to copy.
    assert (f"Interrupted at step 3; checkpoint saved in {checkpoint}. Resume with: "
            f"bit-axon train --resume -o '{out}'") in result.output
    assert "Training summary" not in result.output


def test_success_prints_the_adapter_path_unbroken(tmp_path, sft, seen):
    out = tmp_path / ("a-long-directory-name-" * 4)
    result = runner.invoke(app, ["train", str(sft), "--config-small", "-o", str(out)], terminal_width=40)
    assert result.exit_code == 0, result.output
    assert "Adapter: adapter.safetensors\n" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"bit-axon {version('bit-axon')}\n"


def test_the_written_settings_file_reads_back_into_the_same_settings(tmp_path, sft, seen):
    from bit_axon.cli.train import write_run_settings

    config = TrainingConfig(lora_rank=4, learning_rate=3e-5, use_dora=False, max_steps=3, epochs=2,
                            output_dir=str(tmp_path / "a"), memory_limit_gb=1.5, report_to="none")
    path = write_run_settings(config, {"data": sft, "model_weights": None, "config_small": True, "tokenizer":
                                       "Qwen/Qwen2.5-3B", "val_data": None, "format": "messages", "no_thermal": True})
    assert path == tmp_path / "a" / "train_config.yaml" and path.read_text().startswith("# ")
    result = _train("--config", path, "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    import dataclasses

    assert seen["config"] == dataclasses.replace(config, output_dir=str(tmp_path / "b"))
    assert (seen["data"], seen["data_format"], seen["config_small"], seen["thermal"]) == (sft, "messages", True, False)
    json.dumps(seen["config"].to_dict())  # plain values, as a checkpoint records them

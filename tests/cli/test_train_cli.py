import json
from pathlib import Path

from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.cli.main import app
from bit_axon.loading import save_model

import mlx.core as mx
import pytest
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose vocabulary still covers the Qwen2.5 tokenizer."""
    mx.random.seed(0)
    config = BitAxonConfig(
        hidden_dim=64, num_layers=3, num_heads=2, d_source_model=64, ssm_d_state=4, ssm_expand=2,
        swa_window_size=32, moe_num_experts=2, moe_top_k=1, moe_intermediate_dim=64,
    )
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(BitAxonModel(config), path)
    return path


def _subset(tmp_path, name, n):
    out = tmp_path / name
    out.write_text("".join((EXAMPLES / name).read_text().splitlines(keepends=True)[:n]))
    return out


def _train(*args):
    return runner.invoke(app, ["train", *map(str, args)], catch_exceptions=False)


COMMON = ["--max-seq-len", "96", "--batch-size", "2", "--grad-accum-steps", "1", "--warmup-steps", "1", "--no-thermal"]


def test_train_then_resume(tmp_path, model_dir):
    data = _subset(tmp_path, "sft.jsonl", 16)
    out = tmp_path / "run"
    result = _train(data, "-w", model_dir, "--max-steps", "2", "--save-every", "1", "-o", out, "-lr", "1e-3", *COMMON)
    assert result.exit_code == 0, result.output
    assert "Training summary" in result.output
    assert (out / "final_adapter.safetensors").exists()
    assert sorted(p.name for p in out.glob("step_*")) == ["step_00000001", "step_00000002"]
    # The rest of the settings, the data and the model come from the run's own train_config.yaml.
    result = _train("--max-steps", "3", "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "Resumed from" in result.output
    assert "Settings changed since step_00000002: max_steps 2 -> 3." in result.output
    state = json.loads((out / "step_00000003" / "training_state.json").read_text())
    assert state["step"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def _losses(run: Path) -> list[tuple[float, float | None]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r.get("val_loss")) for r in records]


def test_the_written_settings_repeat_the_run(tmp_path, model_dir):
    data, val = _subset(tmp_path, "sft.jsonl", 8), _subset(tmp_path, "sft_val.jsonl", 4)
    first, again = tmp_path / "first", tmp_path / "again"
    result = _train(data, "-w", model_dir, "--val-data", val, "--max-steps", "2", "--eval-every", "1",
                    "--lora-rank", "4", "--no-dora", "-lr", "1e-3", "-o", first, *COMMON)
    assert result.exit_code == 0, result.output
    settings = (first / "train_config.yaml").read_text()
    assert f"\ndata: {data}\nmodel_weights: {model_dir}\n" in settings and "\nlora_rank: 4\n" in settings
    result = _train("--config", first / "train_config.yaml", "-o", again)
    assert result.exit_code == 0, result.output
    assert _losses(again) == _losses(first) and all(val is not None for _, val in _losses(first))
    assert (again / "train_config.yaml").read_text() == settings.replace(str(first), str(again))


def test_dry_run_prints_the_estimate_and_trains_nothing(tmp_path, model_dir, monkeypatch):
    from bit_axon.training import memory

    seen = {}

    def estimate(model, config):
        seen.update(model=model, config=config)
        return memory.MemoryEstimate(total_bytes=3 * 2**30, parts={"weights": 3 * 2**30})

    monkeypatch.setattr(memory, "estimate_training_memory", estimate)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2 * 2**30)
    monkeypatch.setattr(memory, "describe_memory", lambda est, available: [
        f"Estimated peak {est.total_bytes / 2**30:.1f} GB of {available / 2**30:.1f} GB", "Warning: it will not fit"])
    out = tmp_path / "dry"
    result = _train(_subset(tmp_path, "sft.jsonl", 4), "-w", model_dir, "-o", out, "--dry-run", "--lora-rank", "2",
                    *COMMON)
    assert result.exit_code == 0, result.output
    assert "Estimated peak 3.0 GB of 2.0 GB\nWarning: it will not fit\n" in result.output
    assert "Dry run: nothing was trained." in result.output and "Training summary" not in result.output
    assert seen["config"].lora_rank == 2 and hasattr(seen["model"], "trainable_parameters")
    assert not out.exists() or list(out.iterdir()) == []


def test_orpo_mode_detected_from_the_file(tmp_path, model_dir):
    data = _subset(tmp_path, "orpo.jsonl", 8)
    result = _train(data, "-w", model_dir, "--max-steps", "1", "-o", tmp_path / "orpo", "--beta", "0.2", *COMMON)
    assert result.exit_code == 0, result.output
    assert "reward_margin" in result.output and "reward_accuracy" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl", "--config-small"], "Training data not found"),
        (["{sft}"], "--model-weights is required"),
        (["{sft}", "--config-small", "-lr", "-1"], "Error: --learning-rate: must be > 0, got -1.0"),
        (["{sft}", "--config-small", "--lora-rank", "-3"], "Error: --lora-rank: must be a positive integer, got -3"),
        (["{sft}", "--config-small", "--no-dora", "--lora-dropout", "1"], "Error: --lora-dropout: must be in [0, 1)"),
        (["{orpo}", "--config-small", "--training-mode", "sft"], "--training-mode orpo"),
        (["{sft}", "--config-small", "--temp-pause", "99", "--temp-stop", "90"], "--temp-pause < --temp-stop"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, args, message):
    sft, orpo = _subset(tmp_path, "sft.jsonl", 4), _subset(tmp_path, "orpo.jsonl", 4)
    args = [a.format(sft=sft, orpo=orpo) for a in args]
    result = runner.invoke(app, ["train", *args, "-o", str(tmp_path / "x"), "--no-thermal"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


# --- the options are TrainingConfig's fields --------------------------------------------------------

GUIDE_OPTIONS = {  # the guide's table: flag -> (short flag, default)
    "--model-weights": ("-w", None), "--tokenizer": ("-t", "Qwen/Qwen2.5-3B"), "--val-data": (None, None),
    "--lora-rank": (None, 8), "--lora-dropout": (None, 0.0), "--lora-scale": (None, 20.0),
    "--no-dora": (None, False), "--learning-rate": ("-lr", 1e-4), "--max-steps": (None, 10_000),
    "--batch-size": (None, 1), "--grad-accum-steps": (None, 4), "--max-seq-len": (None, 2048),
    "--warmup-steps": (None, 100), "--max-grad-norm": (None, 1.0), "--seed": (None, 42),
    "--no-thermal": (None, False), "--temp-pause": (None, 85.0), "--temp-stop": (None, 95.0),
    "--output-dir": ("-o", "checkpoints"), "--save-every": (None, 500), "--eval-every": (None, 500),
    "--resume": (None, False), "--config-small": (None, False),
}


def _train_options():
    import typer

    command = typer.main.get_command(app).commands["train"]
    return {opt: (param, param.opts + param.secondary_opts) for param in command.params for opt in param.opts}


def test_help_has_the_guides_options_short_flags_and_defaults():
    options = _train_options()
    for flag, (short, default) in GUIDE_OPTIONS.items():
        param, names = options[flag]
        assert (short in names) if short else len(names) == 1, flag
        assert param.default == default, flag
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for line in ("--lora-rank", "[default: 8]", "[default: 20.0]", "[default: 0.0001]", "[default: checkpoints]"):
        assert line in result.output


def test_every_training_config_field_is_an_option():
    from dataclasses import fields

    from bit_axon.training.config import TrainingConfig

    names = {param.name for param, _ in _train_options().values()}
    assert {f.name for f in fields(TrainingConfig)} <= names


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], {}),
        (["--no-dora", "--max-steps", "3", "-lr", "2e-4", "-o", "{out}"],
         {"use_dora": False, "max_steps": 3, "learning_rate": 2e-4, "output_dir": "{out}"}),
        (["--quantize-mode", "affine", "--quantize-bits", "5", "--grad-checkpoint"],
         {"quantize_mode": "affine", "quantize_bits": 5, "grad_checkpoint": True}),
        # The guide's CLI has no warm threshold: a low --temp-pause takes the warm zone down with it.
        (["--temp-pause", "70", "--temp-stop", "80"], {"temp_pause": 70.0, "temp_stop": 80.0, "temp_max_speed": 69.0}),
        (["--temp-pause", "70", "--temp-max-speed", "60"], {"temp_pause": 70.0, "temp_max_speed": 60.0}),
        (["--training-mode", "sft", "--memory-limit-gb", "2"], {"memory_limit_gb": 2.0}),
    ],
)
def test_only_the_options_given_override_training_config(tmp_path, monkeypatch, args, expected):
    from bit_axon.training.config import TrainingConfig

    seen = {}

    def fake_run_training(data, config, **kwargs):
        seen["config"] = config
        return {"adapter_path": "x", "step": 0}

    monkeypatch.setattr("bit_axon.cli.train.run_training", fake_run_training)
    sft = _subset(tmp_path, "sft.jsonl", 2)
    out = str(tmp_path / "out")
    args = [a.format(out=out) for a in args]
    result = runner.invoke(app, ["train", str(sft), "--config-small", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = {k: v.format(out=out) if isinstance(v, str) else v for k, v in expected.items()}
    assert seen["config"] == TrainingConfig(**{"training_mode": "sft", **expected})


def test_run_training_uses_the_tokenizers_special_ids(tmp_path, monkeypatch, model_dir):
    import bit_axon.loading
    import bit_axon.tokenizer
    from bit_axon.training.trainer import Trainer

    class OtherIds(bit_axon.tokenizer.QwenTokenizerWrapper):  # ids unlike packing's Qwen defaults
        def __init__(self, *args):
            super().__init__(*args)
            self.eos_token_id, self.pad_token_id = 7, 9

    monkeypatch.setattr(bit_axon.tokenizer, "QwenTokenizerWrapper", OtherIds)
    monkeypatch.setattr(bit_axon.loading, "QwenTokenizerWrapper", OtherIds)  # a Bit-Axon directory's tokenizer
    seen = {}

    def fake_train(self, resume=False):
        seen.update(eos=self.eos_token_id, pad=self.pad_token_id)
        return {"adapter_path": "x", "step": 0}

    monkeypatch.setattr(Trainer, "train", fake_train)
    data = _subset(tmp_path, "sft.jsonl", 2)
    result = _train(data, "-w", model_dir, "-o", tmp_path / "run", "--max-steps", "1", *COMMON)
    assert result.exit_code == 0, result.output
    assert seen == {"eos": 7, "pad": 9}


def test_an_existing_file_as_output_dir_is_a_one_line_error(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    result = runner.invoke(app, ["train", str(_subset(tmp_path, "sft.jsonl", 2)), "--config-small", "-o", str(taken)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{taken} is an existing file, but --output-dir names a directory" in result.output
    assert taken.read_text() == "keep me"


def test_a_non_finite_base_is_named_not_blamed_on_the_learning_rate(tmp_path, model_dir):
    from nonfinite import poisoned_copy

    bad, name = poisoned_copy(model_dir, tmp_path / "bad")
    result = runner.invoke(app, ["train", str(_subset(tmp_path, "sft.jsonl", 4)), "-w", str(bad), "-o", str(tmp_path / "run"),
                                 "--max-steps", "1", *COMMON])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"tensor {name!r} holds NaN or Inf" in result.output and "learning" not in result.output


def test_orpo_form_flag(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("bit_axon.cli.train.run_training", lambda data, config, **kw: seen.update(config=config) or
                        {"adapter_path": "x", "step": 0})
    orpo = _subset(tmp_path, "orpo.jsonl", 2)
    result = runner.invoke(app, ["train", str(orpo), "--config-small", "--orpo-form", "paper"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["config"].orpo_form == "paper"
    assert runner.invoke(app, ["train", str(orpo), "--config-small", "--orpo-form", "trl"]).exit_code == 2


def test_output_dir_that_is_the_model_directory_is_refused(tmp_path, model_dir):
    # Its adapters and checkpoints would add *.safetensors files that make the model unloadable.
    before = sorted(p.name for p in model_dir.iterdir())
    result = runner.invoke(app, ["train", str(_subset(tmp_path, "sft.jsonl", 2)), "-w", str(model_dir), "-o", str(model_dir),
                                 *COMMON])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--output-dir {model_dir} is the input model" in result.output and "--overwrite" not in result.output
    assert sorted(p.name for p in model_dir.iterdir()) == before

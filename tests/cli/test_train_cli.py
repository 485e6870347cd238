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
    result = _train(data, "-w", model_dir, "--max-steps", "3", "--save-every", "1", "-o", out, "--resume", *COMMON)
    assert result.exit_code == 0, result.output
    assert "Resumed from" in result.output
    state = json.loads((out / "step_00000003" / "training_state.json").read_text())
    assert state["step"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


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
        (["{sft}", "--config-small", "-lr", "-1"], "learning_rate must be > 0"),
        (["{orpo}", "--config-small", "--training-mode", "sft"], "--training-mode orpo"),
        (["{sft}", "--config-small", "--temp-pause", "99", "--temp-stop", "90"], "temp_pause < temp_stop"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, args, message):
    sft, orpo = _subset(tmp_path, "sft.jsonl", 4), _subset(tmp_path, "orpo.jsonl", 4)
    args = [a.format(sft=sft, orpo=orpo) for a in args]
    result = runner.invoke(app, ["train", *args, "-o", str(tmp_path / "x"), "--no-thermal"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output

"""``bit-axon upload``: the model card and the repository's layout, offline; no network fails fast and clearly."""

from __future__ import annotations

import json
import shlex

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonModel
from bit_axon.cli.main import app
from bit_axon.inference.model_card import CARD, plan_upload
from bit_axon.loading import save_model
from bit_axon.training.callbacks import BEST_ADAPTER, FINAL_ADAPTER, read_metrics
from bit_axon.training.trainer import Trainer
from toy import config, copy_task, tiny_model, trainer_kwargs

import pytest
import typer
import yaml
from typer.testing import CliRunner

runner = CliRunner()
HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _trained_run(folder, source):
    """A training output directory: adapters, metrics, plot, a checkpoint and train_config.yaml."""
    data = folder / "data" / "chat.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")
    model = tiny_model()
    model.source = source
    cfg = config(folder, max_steps=2, eval_every=2, save_every=2)
    Trainer(model, cfg, copy_task(20), copy_task(4, seed=3), **trainer_kwargs()).train()
    run = folder / "run"
    settings = {"data": str(data), "model_weights": source, "tokenizer": "Qwen/Qwen2.5-3B", **cfg.to_dict()}
    (run / "train_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return run


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    return _trained_run(tmp_path_factory.mktemp("hub"), HUB_BASE)


@pytest.fixture
def merged(tmp_path):
    model = tiny_model()
    base = BitAxonModel(model.config)
    return save_model(base, tmp_path / "merged")


def _adapters_in(run):
    return [name for name in (BEST_ADAPTER, FINAL_ADAPTER) if (run / name).exists()]


def _flags(command: str) -> set[str]:
    """Every flag ``bit-axon COMMAND`` takes."""
    return {opt for param in typer.main.get_command(app).commands[command].params for opt in param.opts}


def _check_flags(line: str) -> None:
    """The card's command line uses only flags its command has."""
    words = shlex.split(line)
    assert words[0] == "bit-axon" and {w for w in words if w.startswith("-")} <= _flags(words[1]), line


def test_an_adapter_run_uploads_its_adapters_metrics_and_plot_with_a_card(hub_run):
    plan = plan_upload(hub_run, "you/tiny-sft")
    adapters = _adapters_in(hub_run)
    assert plan.kind == "adapter"
    assert plan.files == {name: hub_run / name for name in (*adapters, "metrics.jsonl", "loss.png")}
    card = plan.card
    assert card.startswith("---\ntags:\n") and f"\nbase_model: {HUB_BASE}\n---\n" in card
    assert f"- base model: [{HUB_BASE}](https://huggingface.co/{HUB_BASE})" in card
    command = f"bit-axon run -m {HUB_BASE} --adapter tiny-sft/{adapters[0]} Hello"
    assert f"bit-axon download you/tiny-sft --dir tiny-sft\n{command}\n" in card
    for line in card.split("```bash\n", 1)[1].split("```", 1)[0].splitlines():
        _check_flags(line.split("   #")[0])
    records = read_metrics(hub_run / "metrics.jsonl")
    assert "| steps | 2 |" in card
    assert f"| final train loss | {records[-1]['loss']:.4f} (step 2) |" in card
    assert f"| final validation loss | {records[-1]['val_loss']:.4f} (step 2) |" in card
    assert "- training data: `chat.jsonl`" in card
    assert str(hub_run.parent) not in card  # no local folder of the uploader
    settings = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert settings["lora_rank"] == 4 and settings["data"] == "chat.jsonl" and "output_dir" not in settings


def test_a_run_whose_base_is_its_own_folder_uploads_that_base(tmp_path):
    base = tmp_path / "run" / "base_model"
    save_model(BitAxonModel(tiny_model().config), base)
    run = _trained_run(tmp_path, str(base))
    plan = plan_upload(run, "you/small")
    assert {"base_model/config.json", "base_model/model.safetensors"} <= set(plan.files)
    assert not any(name.startswith("step_") or name == "train_config.yaml" for name in plan.files)
    assert f"bit-axon run -m small/base_model --adapter small/{_adapters_in(run)[0]} Hello" in plan.card
    assert "base_model:" not in plan.card.split("---")[1]  # not a hub id: no hub link in the metadata


def test_a_model_directory_uploads_its_files_with_a_card(merged):
    plan = plan_upload(merged, "you/merged")
    assert plan.kind == "model" and set(plan.files) == {"config.json", "model.safetensors"}
    assert "bit-axon run -m you/merged Hello" in plan.card
    assert "A `bit_axon` model directory" in plan.card or "model directory saved by Bit-Axon" in plan.card


def test_a_readme_already_there_is_uploaded_instead_of_the_card(merged):
    (merged / CARD).write_text("# My own card\n")
    plan = plan_upload(merged, "you/merged")
    assert plan.card == "# My own card\n" and plan.card_is_users and CARD not in plan.files


def test_a_directory_without_adapter_or_model_is_refused(tmp_path, hub_run):
    result = runner.invoke(app, ["upload", str(tmp_path), "--repo-id", "you/x", "--dry-run"])
    assert result.exit_code == 1
    assert "holds neither a trained adapter" in result.output and "Traceback" not in result.output
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "step_00000002").symlink_to(hub_run / "step_00000002", target_is_directory=True)
    result = runner.invoke(app, ["upload", str(interrupted), "--repo-id", "you/x", "--dry-run"])
    assert result.exit_code == 1 and f"bit-axon train --resume -o {interrupted}" in result.output


def test_dry_run_prints_the_listing_and_card_and_writes_nothing(hub_run):
    before = sorted(p.name for p in hub_run.iterdir())
    result = runner.invoke(app, ["upload", str(hub_run), "--repo-id", "you/tiny-sft", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"  metrics.jsonl  <- {hub_run / 'metrics.jsonl'}" in result.output
    assert "  README.md  (model card, below)" in result.output
    assert plan_upload(hub_run, "you/tiny-sft").card in result.output
    assert sorted(p.name for p in hub_run.iterdir()) == before


class _NoHub:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the hub client was reached although the hub is unreachable")


def test_no_network_fails_with_a_clear_message_before_the_hub_client(merged, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    result = runner.invoke(app, ["upload", str(merged), "--repo-id", "you/merged"])
    assert result.exit_code == 1
    assert "Error: cannot reach the Hugging Face hub at http://127.0.0.1:9 (no connection within 3 s); " \
           "nothing was uploaded" in result.output


def test_upload_creates_the_repo_and_commits_the_files_and_card(merged, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = (repo_id, kwargs)

        def create_commit(self, repo_id, operations, commit_message):
            calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr("bit_axon.cli.upload.hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = runner.invoke(app, ["upload", str(merged), "--repo-id", "you/merged", "--private", "--token", "T"])
    assert result.exit_code == 0, result.output
    assert calls["token"] == "T" and calls["repo"] == ("you/merged", {"private": True, "exist_ok": True})
    files = calls["files"]
    assert set(files) == {"config.json", "model.safetensors", CARD}
    assert files["config.json"] == str(merged / "config.json")
    assert json.loads((merged / "config.json").read_text())  # untouched, still the model's
    assert files[CARD].decode() == plan_upload(merged, "you/merged").card
    assert not (merged / CARD).exists()
    assert "Uploaded model" in result.output and "https://hub.example/you/merged/commit/1" in result.output

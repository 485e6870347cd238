import json
from pathlib import Path

from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.inference import generate
from bit_axon.training.checkpoint import ADAPTERS_FILE
from bit_axon.training.data import DatasetError, SFTDataset
from bit_axon.training.lora import apply_lora_to_model
from bit_axon.training.samples import EvalSamples, dataset_prompts, read_prompts
from bit_axon.training.trainer import Trainer
from toy import config

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_prompt_files_json_records_and_plain_text(tmp_path):
    records = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": "Name a colour."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
    ]) + "\n")
    assert read_prompts(records) == [
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    ]
    text = _write(tmp_path / "p.txt", "First prompt\n\n  Second prompt  \n")
    assert read_prompts(text) == [[{"role": "user", "content": "First prompt"}],
                                  [{"role": "user", "content": "Second prompt"}]]


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', r"p.jsonl:2: a prompt record needs a 'prompt' or a 'messages' field"),
    ('{"messages": [{"role": "assistant", "content": "A"}]}\n', r"p.jsonl:1: nothing before the assistant turn"),
    ('{"prompt": [{"role": "robot", "content": "x"}]}\n', r"p.jsonl:1: prompt\[0\] has unknown role 'robot'"),
    ("", r"p.jsonl: no prompts"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
    with pytest.raises(DatasetError, match=message):
        read_prompts(_write(tmp_path / "p.jsonl", content))
    with pytest.raises(DatasetError, match=r"missing.txt: file not found \(--eval-prompts\)"):
        read_prompts(tmp_path / "missing.txt")


def test_validation_prompts_are_the_turns_before_the_last_answer():
    first, second = dataset_prompts(EXAMPLES / "sft.jsonl", 2)
    assert first[-1] == {"role": "user", "content": "Write 'bread' in capital letters."} and len(first) == 3
    assert second == [{"role": "user", "content": "What day comes after Wednesday?"}]
    assert dataset_prompts(EXAMPLES / "alpaca.jsonl", 1)[0][0]["role"] == "user"


def _qwen_vocab_model() -> BitAxonModel:
    mx.random.seed(0)
    model = BitAxonModel(BitAxonConfig(
        hidden_dim=32, num_layers=3, num_heads=2, d_source_model=32, ssm_d_state=4, ssm_expand=2,
        swa_window_size=32, moe_num_experts=2, moe_top_k=1, moe_intermediate_dim=32,
    ))
    apply_lora_to_model(model, rank=4, dropout=0.3, scale=2.0, use_dora=False)  # dropout: draws random numbers
    mx.eval(model.parameters())
    return model


def _lines(tmp_path: Path, name: str, n: int) -> Path:
    return _write(tmp_path / name, "".join((EXAMPLES / name).read_text().splitlines(keepends=True)[:n]))


def test_samples_at_each_evaluation_go_to_metrics_and_leave_training_as_it_is(tmp_path, qwen_tokenizer):
    train = SFTDataset(_lines(tmp_path, "sft.jsonl", 8), qwen_tokenizer, 96)
    val = SFTDataset(_lines(tmp_path, "sft_val.jsonl", 4), qwen_tokenizer, 96)
    prompts = _write(tmp_path / "prompts.txt", "Say hello.\nCount to three.\n")
    settings = dict(max_steps=2, eval_every=2, grad_accum_steps=1, max_seq_len=96, sample_max_tokens=3)

    def run(name: str, **kw) -> tuple[Trainer, str]:
        console = Console(record=True, width=200)
        trainer = Trainer(_qwen_vocab_model(), config(tmp_path / name, **settings, **kw), train, val,
                          console=console, show_progress=False, tokenizer=qwen_tokenizer, generate=generate)
        trainer.train()
        return trainer, console.export_text()

    sampled, printed = run("sampled", eval_prompts=str(prompts), eval_samples=5)
    records = [json.loads(line) for line in (tmp_path / "sampled" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "samples" not in records[0]  # no evaluation at step 1
    assert [s["prompt"] for s in records[1]["samples"]] == ["Say hello.", "Count to three."]
    assert all(isinstance(s["completion"], str) for s in records[1]["samples"])
    assert "Samples at step 2" in printed and "> Count to three." in printed
    assert sampled.model.training

    # The same run without samples reaches the same adapters: sampling took no random draws from it.
    plain, printed = run("plain", eval_samples=0)
    assert "Samples at step" not in printed and all("samples" not in r for r in plain.history)
    a = mx.load(str(tmp_path / "sampled" / "run" / "step_00000002" / ADAPTERS_FILE))
    b = mx.load(str(tmp_path / "plain" / "run" / "step_00000002" / ADAPTERS_FILE))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_by_default_the_samples_answer_the_first_validation_prompts(tmp_path, qwen_tokenizer):
    val = SFTDataset(_lines(tmp_path, "sft_val.jsonl", 4), qwen_tokenizer, 96)
    trainer = Trainer(_qwen_vocab_model(), config(tmp_path, max_seq_len=96, eval_samples=2), val, val,
                      show_progress=False, tokenizer=qwen_tokenizer, generate=generate)
    [samples] = [c for c in trainer.callbacks if isinstance(c, EvalSamples)]
    assert samples.prompts == dataset_prompts(val.path, 2) and samples.max_tokens == trainer.config.sample_max_tokens
    with pytest.raises(ValueError, match="eval_samples: the validation set was not read from a file"):
        Trainer(_qwen_vocab_model(), config(tmp_path, max_seq_len=96), val, list(val), show_progress=False,
                eos_token_id=val.eos_token_id, pad_token_id=val.pad_token_id, tokenizer=qwen_tokenizer,
                generate=generate)

"""``bit-axon run`` and ``bit-axon evaluate`` end to end on tiny saved models, through CliRunner."""

from __future__ import annotations

import json
import re

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.cli.main import app
from bit_axon.cli.run import CHAT_HELP, prompt_ids
from bit_axon.inference import evaluate_model, generate, load_for_inference
from bit_axon.loading import save_model
from bit_axon.quantization import quantize_model
from bit_axon.training.checkpoint import save_adapter_only
from bit_axon.training.data import load_dataset_file
from bit_axon.training.lora import adapter_layers, apply_lora_to_model

import mlx.core as mx
import pytest
from typer.testing import CliRunner

runner = CliRunner()


def tiny_model(hidden_dim: int = 64) -> BitAxonModel:
    mx.random.seed(0)
    # The real tokenizer's ids go up to 151664, so the vocabulary stays full size; the rest is tiny.
    config = BitAxonConfig.small(hidden_dim=hidden_dim, d_source_model=64, moe_intermediate_dim=128, num_heads=4)
    model = BitAxonModel(config)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = save_model(tiny_model(), root / "base")
    quantized = save_model(quantize_model(tiny_model(), bits=4, group_size=32, mode="nf4"), root / "nf4")
    adapted = tiny_model()
    apply_lora_to_model(adapted, rank=2)
    for _, layer in adapter_layers(adapted):
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(1)) * 0.5
    adapter = save_adapter_only(adapted, root / "adapter.safetensors")
    other = tiny_model(hidden_dim=32)
    apply_lora_to_model(other, rank=2)
    wrong_adapter = save_adapter_only(other, root / "wrong.safetensors")
    return {"base": base, "nf4": quantized, "adapter": adapter, "wrong_adapter": wrong_adapter}


def chat_ids(tok, text, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    return tok.apply_chat_template([*messages, {"role": "user", "content": text}], add_generation_prompt=True)


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output


def test_run_reads_the_prompt_from_stdin(models, qwen_tokenizer):
    result = runner.invoke(app, ["run", "-m", str(models["base"]), "--max-tokens", "6", "--temperature", "0"], input="Hello there")
    assert result.exit_code == 0, result.output
    model = load_for_inference(models["base"])
    expected = generate(model, qwen_tokenizer, chat_ids(qwen_tokenizer, "Hello there"), max_tokens=6)
    assert result.stdout == expected + "\n"
    assert re.search(r"generation: \d+ tokens, [\d.]+ tokens/s", result.stderr)


def test_run_with_adapter_on_top(models, qwen_tokenizer):
    args = ["run", "Hi", "-m", str(models["base"]), "--max-tokens", "6", "--temperature", "0"]
    result = runner.invoke(app, [*args, "--adapter", str(models["adapter"]), "--no-stream"])
    assert result.exit_code == 0, result.output
    adapted = load_for_inference(models["base"], models["adapter"])
    expected = generate(adapted, qwen_tokenizer, chat_ids(qwen_tokenizer, "Hi"), max_tokens=6)
    plain = generate(load_for_inference(models["base"]), qwen_tokenizer, chat_ids(qwen_tokenizer, "Hi"), max_tokens=6)
    assert expected != plain  # the adapter changes the output, so the check below has teeth
    assert result.stdout == expected + "\n"
    assert_one_line_error(runner.invoke(app, [*args, "--adapter", str(models["wrong_adapter"])]), "does not match")


def test_run_quantized_raw_and_seeded(models, qwen_tokenizer):
    args = ["run", "The sky is", "-m", str(models["nf4"]), "--raw", "--max-tokens", "5", "--temperature", "1.0", "--seed", "7"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    model = load_for_inference(models["nf4"])
    assert model.config.quantization["mode"] == "nf4"
    expected = generate(model, qwen_tokenizer, "The sky is", max_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    assert first.stdout == expected + "\n"


def test_run_chat(models, qwen_tokenizer):
    result = runner.invoke(
        app, ["run", "-m", str(models["base"]), "--chat", "--max-tokens", "3", "--temperature", "0", "--system", "Be brief."],
        input="Hi!\n/reset\n\nAgain\n/exit\nnever read\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("tokens/s") == 4  # two replies, each with its prompt and generation speed
    # Greedy, and /reset makes the second turn a fresh conversation: each reply is what a one-shot
    # generation from the same rendered prompt gives (a random model's replies may hold newlines).
    model = load_for_inference(models["base"])
    replies = [
        generate(model, qwen_tokenizer, chat_ids(qwen_tokenizer, text, system="Be brief."), max_tokens=3)
        for text in ("Hi!", "Again")
    ]
    assert result.stdout == "".join(reply + "\n" for reply in replies)


def test_chat_help_and_reset_are_commands_not_messages(models):
    result = runner.invoke(
        app, ["run", "-m", str(models["base"]), "--chat", "--max-tokens", "2", "--temperature", "0"],
        input="/help\nHi!\n/reset\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("tokens/s") == 2  # one reply: /help and /reset never reach the model
    assert CHAT_HELP in result.stderr and "Conversation cleared." in result.stderr
    assert "Commands" not in result.stdout and result.stdout.count("\n") == 1


def test_run_renders_the_prompt_with_the_models_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    question = "What is the capital of France?"
    ids = prompt_ids(tok, question)
    assert ids == tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = prompt_ids(tok, question, system="Be brief.")
    assert tok.decode(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt_ids(tok, question, raw=True) == tok.encode(question)


def test_run_errors(models, tmp_path):
    assert_one_line_error(runner.invoke(app, ["run", "x", "-m", str(tmp_path / "missing")]), "not found")
    assert_one_line_error(runner.invoke(app, ["run", "x", "-m", str(models["base"]), "--adapter", str(tmp_path / "a")]), "not found")
    assert_one_line_error(runner.invoke(app, ["run", "x"]), "no model")
    assert_one_line_error(runner.invoke(app, ["run", "x", "--config-small", "--top-p", "0"]), "top_p")
    assert_one_line_error(runner.invoke(app, ["run", "--chat", "--raw", "--config-small"]), "--raw")
    assert_one_line_error(runner.invoke(app, ["run", "x", "--config-small", "--max-tokens", "0"]), "--max-tokens")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHATS = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris 🗼"}]},
]
PREFS = [{"prompt": "Say hi", "chosen": "Hello! 你好", "rejected": "No."}]


def parse(stdout):
    match = re.fullmatch(r"loss ([\d.]+)  perplexity ([\d.]+)  tokens (\d+)\n", stdout)
    assert match, stdout
    return float(match[1]), float(match[2]), int(match[3])


def test_evaluate(models, qwen_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    result = runner.invoke(app, ["evaluate", str(models["base"]), "--data", str(data), "--seq-length", "64"])
    assert result.exit_code == 0, result.output
    loss, ppl, tokens = parse(result.stdout)
    model = load_for_inference(models["base"])
    expected = evaluate_model(model, load_dataset_file(data, qwen_tokenizer, max_seq_len=64), 1, 64)
    assert loss == pytest.approx(expected["loss"], abs=1e-4) and tokens == expected["tokens"]
    assert ppl == pytest.approx(expected["perplexity"], rel=1e-3)

    capped = runner.invoke(app, ["evaluate", str(models["base"]), "--data", str(data), "--max-tokens", "5",
                                 "--adapter", str(models["adapter"]), "--batch-size", "2", "--seq-length", "32"])
    assert capped.exit_code == 0, capped.output
    assert parse(capped.stdout)[2] == 5

    prefs = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    chosen = write_jsonl(tmp_path / "chosen.jsonl", [
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello! 你好"}]}
    ])
    on_prefs = runner.invoke(app, ["evaluate", str(models["nf4"]), "--data", str(prefs), "--seq-length", "32"])
    on_chosen = runner.invoke(app, ["evaluate", str(models["nf4"]), "--data", str(chosen), "--seq-length", "32"])
    assert on_prefs.exit_code == 0, on_prefs.output
    assert parse(on_prefs.stdout) == parse(on_chosen.stdout)


def test_evaluate_errors(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    assert_one_line_error(runner.invoke(app, ["evaluate", str(models["base"]), "--data", str(bad)]), "bad.jsonl:1")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "none"), "--data", str(bad)]), "not found")

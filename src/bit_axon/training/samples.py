"""Samples at each evaluation: the model's greedy answers to a few prompts, to read beside val_loss.

The prompts come from ``TrainingConfig.eval_prompts`` (``--eval-prompts``), a file of

* JSON records (``.jsonl`` or ``.json``), each ``{"prompt": "text" or [messages]}`` or
  ``{"messages": [...]}``, whose prompt is the messages before its last assistant turn (all of them
  when it has none), or
* plain text (any other name): one prompt per non-blank line,

or by default from the validation file: the prompts of its first ``eval_samples`` records (a chat's
messages before its last assistant turn, an Alpaca instruction, a preference pair's prompt).

Each prompt is rendered with the tokenizer's chat template and generation prompt, as
``bit-axon run`` does, and answered greedily by ``bit_axon.inference.generate``, which the caller
passes in (``Trainer(tokenizer=..., generate=...)``: training code does not import inference), with
the model in eval mode (no adapter dropout). Greedy sampling draws no random numbers and the trainer reseeds MLX's generator
before every step, so sampling leaves the training run, and its exact resume, as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bit_axon.training.callbacks import Callback
from bit_axon.training.records import (
    DatasetError,
    Record,
    _messages,
    alpaca_messages,
    detect_format,
    iter_records,
    orpo_parts,
    read_records,
    sft_messages,
)

from rich.markup import escape

if TYPE_CHECKING:
    from bit_axon.tokenizer import BaseTokenizer
    from bit_axon.training.trainer import Trainer

    import mlx.nn as nn

Messages = list[dict[str, str]]
# bit_axon.inference.generate's signature: (model, tokenizer, prompt ids, max_tokens, **options) -> text
Generate = Callable[..., str]
JSON_SUFFIXES = (".jsonl", ".json")


def prompt_messages(messages: Messages, where: str) -> Messages:
    """The messages before the last assistant turn (all of them when there is none)."""
    roles = [m["role"] for m in messages]
    prompt = messages[: len(roles) - roles[::-1].index("assistant") - 1] if "assistant" in roles else messages
    if not prompt:
        raise DatasetError(f"{where}: nothing before the assistant turn to use as a prompt")
    return prompt


def _record_prompt(record: Record) -> Messages:
    if "prompt" in record.data:
        value = record.data["prompt"]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        return prompt_messages(_messages(value, record.where, "prompt"), record.where)
    if "messages" in record.data:
        return prompt_messages(_messages(record.data["messages"], record.where, "messages"), record.where)
    raise DatasetError(f"{record.where}: a prompt record needs a 'prompt' or a 'messages' field "
                       f"(fields: {sorted(record.data)})")


def read_prompts(path: str | Path) -> list[Messages]:
    """The prompts of an ``--eval-prompts`` file (see the module); errors name ``file:line``."""
    path = Path(path)
    if path.suffix in JSON_SUFFIXES:
        prompts = [_record_prompt(r) for r in iter_records(path)]
    else:
        if not path.is_file():
            raise DatasetError(f"{path}: file not found (--eval-prompts)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
        prompts = [[{"role": "user", "content": line.strip()}] for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DatasetError(f"{path}: no prompts (empty file)")
    return prompts


def dataset_prompts(path: str | Path, count: int) -> list[Messages]:
    """The prompts of the first ``count`` records of a dataset file, in any training format."""
    format = detect_format(path)
    prompts = []
    for record in read_records(path)[:count]:
        if format == "orpo":
            prompts.append(orpo_parts(record)[0])
        else:
            messages = sft_messages(record) if format == "messages" else alpaca_messages(record)
            prompts.append(prompt_messages(messages, record.where))
    return prompts


def generate_samples(
    model: nn.Module, tokenizer: BaseTokenizer, prompts: list[Messages], max_tokens: int, generate: Generate
) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` for each prompt: the greedy completion of its chat rendering.

    ``prompt`` is the text of the prompt's last message. The model is in eval mode meanwhile and
    gets its training mode back afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        samples = []
        for messages in prompts:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            completion = generate(model, tokenizer, ids, max_tokens, temperature=0.0, seed=0)
            samples.append({"prompt": messages[-1]["content"], "completion": completion})
    finally:
        model.train(was_training)
    return samples


class EvalSamples(Callback):
    """At each evaluation (a record with ``val_loss``), ``record["samples"]``: the greedy answers to
    ``prompts``, also printed. Rank 0 alone generates (the other ranks write no records)."""

    def __init__(self, tokenizer: BaseTokenizer, prompts: list[Messages], max_tokens: int, generate: Generate):
        self.tokenizer, self.prompts, self.max_tokens, self.generate = tokenizer, prompts, max_tokens, generate

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "val_loss" not in record or not trainer.is_main:
            return
        samples = generate_samples(trainer.model, self.tokenizer, self.prompts, self.max_tokens, self.generate)
        record["samples"] = samples
        lines = [f"[bold]Samples at step {trainer.step}[/bold]"]
        for sample in samples:
            completion = escape(sample["completion"]).replace("\n", "\n    ")  # a multi-line answer stays indented
            lines += [f"  [cyan]>[/cyan] {escape(sample['prompt'])}", f"    {completion}"]
        trainer.console.print("\n".join(lines), highlight=False, soft_wrap=True)


def eval_samples_callback(
    trainer: Trainer, tokenizer: BaseTokenizer | None, generate: Generate | None
) -> EvalSamples | None:
    """The samples callback a run's settings ask for, or None (``eval_samples=0``, no validation set,
    or no tokenizer: ``Trainer(tokenizer=..., generate=...)`` turns samples on, as ``bit-axon train`` does).

    The prompts are read now, so a bad ``--eval-prompts`` file stops the run before training.
    """
    c = trainer.config
    if c.eval_samples == 0 or trainer.val_dataset is None:
        return None
    if tokenizer is None and generate is None and c.eval_prompts is None:
        return None  # a Trainer used from Python without the means to generate
    if tokenizer is None or generate is None:
        raise ValueError("samples at each evaluation need Trainer(..., tokenizer=..., "
                         "generate=bit_axon.inference.generate); or set eval_samples=0")
    if c.eval_prompts is not None:
        prompts = read_prompts(c.eval_prompts)[: c.eval_samples]
    else:
        path = getattr(trainer.val_dataset, "path", None)
        if path is None:
            raise ValueError("eval_samples: the validation set was not read from a file, so it has no prompts to "
                             "sample; pass --eval-prompts FILE, or --eval-samples 0")
        prompts = dataset_prompts(path, c.eval_samples)
    return EvalSamples(tokenizer, prompts, c.sample_max_tokens, generate)

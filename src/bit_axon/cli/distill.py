"""``bit-axon distill``: a Bit-Axon student learns a teacher's next-token distributions.

The student is a Bit-Axon directory, normally ``bit-axon port-weights TEACHER -o STUDENT``. The
text is ``--data`` (with ``--val-data``, or a held-out share of it), else the teacher's own answers
to seed prompts (``training.distill_data``), written to ``OUT/teacher_text.jsonl``. A finished run
leaves a Bit-Axon model directory in ``OUT/model`` (``config.json``, ``model.safetensors``, the
tokenizer files), with the LoRA adapters merged into it, beside the run's checkpoints and metrics
(the run directory itself is not a model directory: its adapter files would be read as weights).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from bit_axon.cli.demo import examples_dir
from bit_axon.cli.options import Flag, given_settings, settings_options
from bit_axon.cli.paths import check_output_dir, check_run_dir
from bit_axon.cli.run_errors import RunErrors
from bit_axon.training.distill import TRAIN_REST, DistillConfig

import typer
from rich.console import Console

logger = logging.getLogger(__name__)

RUN_FILE = "distill_config.json"  # in OUT: the run's inputs and resolved settings, for --resume
HELD_OUT_FILE = "teacher_text_val.jsonl"  # in OUT: the generated chats held out for the validation KL
MODEL_DIR = "model"  # in OUT: the distilled model, once the run finishes

DISTILL_FLAGS = {
    "top_k": Flag("KL over the teacher's top k tokens plus the rest merged into one (0: the full vocabulary)."),
    "ce_weight": Flag("Weight of the cross-entropy on the text's own next tokens, added to the KL."),
    "train_rest": Flag("What trains besides the SSM mixers, norms and routers: lora, full or frozen.",
                       choices=TRAIN_REST),
    "lora_rank": Flag("LoRA rank (train_rest=lora)."),
    "learning_rate": Flag("Peak learning rate.", "-lr"),
    "warmup_steps": Flag("Warmup steps."),
    "max_steps": Flag("Distillation steps."),
    "batch_size": Flag("Sequences per batch."),
    "max_seq_len": Flag("Tokens per packed sequence."),
    "grad_accum_steps": Flag("Gradient accumulation."),
    "save_every": Flag("Checkpoint interval."),
    "eval_every": Flag("Held-out KL interval."),
    "keep_checkpoints": Flag("Step checkpoints to keep."),
    "max_eval_batches": Flag("Validation batches per evaluation (default: all).", show_default=False),
    "log_every": Flag("Steps between progress lines when the output is not a terminal."),
    "seed": Flag("Random seed (data order, adapters, teacher text)."),
    "grad_checkpoint": Flag("Recompute layers in the backward pass (less memory)."),
    "val_fraction": Flag("Share of the text held out for the validation KL (without --val-data)."),
    "generate_samples": Flag("Teacher answers to generate when no --data is given."),
    "generate_max_tokens": Flag("Tokens per teacher answer."),
    "generate_temperature": Flag("Teacher sampling temperature."),
    "generate_top_p": Flag("Teacher nucleus sampling."),
}


def check_pair(teacher, student, teacher_tokenizer, student_tokenizer, teacher_path: str, student_path: str) -> None:
    """Refuse a teacher and student whose vocabularies or tokenizers differ: the KL compares them token by token."""
    from bit_axon.loading import output_vocab_size

    fix = f"port the student from this teacher: bit-axon port-weights {teacher_path} -o STUDENT"
    tv, sv = output_vocab_size(teacher), output_vocab_size(student)
    if tv != sv:
        raise ValueError(
            f"--teacher {teacher_path} predicts {tv} tokens but --student {student_path} predicts {sv}: distillation "
            f"compares their next-token distributions token by token, so the vocabularies must be the same; {fix}"
        )
    probe = "Distillation check: the quick brown fox, 12345 <tags> and émigrés.\n"
    if teacher_tokenizer.encode(probe) != student_tokenizer.encode(probe):
        raise ValueError(f"--teacher {teacher_path} and --student {student_path} have {tv} tokens each but tokenize "
                         f"text differently, so their token ids mean different things; {fix}")


def teacher_in_float(teacher, console: Console) -> None:
    """Dequantize a quantized teacher once where the backend says a float one runs faster (the CPU)."""
    from bit_axon.inference.loader import in_float_for_speed

    if not in_float_for_speed(teacher):
        return
    console.print("The teacher runs dequantized to float (the same weights): on the CPU a quantized model would "
                  "dequantize them at every pass", highlight=False)


def load_student(path: Path):
    from bit_axon import BitAxonModel
    from bit_axon.loading import BIT_AXON, load_model, model_source

    if model_source(path) != BIT_AXON:
        raise ValueError(f"--student {path} is not a Bit-Axon model directory; make one from the teacher with "
                         f"bit-axon port-weights TEACHER -o {path}")
    model = load_model(path)
    assert isinstance(model, BitAxonModel)
    record = path / "porting.json"
    if record.is_file() and json.loads(record.read_text()).get("ssm_init") == "attention":
        logger.warning("--student %s has the attention start: distillation from it has diverged at its first steps "
                       "(docs/porting.md); port with --ssm-init identity for a stable start", path)
    if model.config.quantization is not None:
        raise ValueError(f"--student {path} is quantized; distill a float student (bit-axon port-weights writes one)")
    return model


def distill_texts(config: DistillConfig, teacher, tokenizer, output_dir: Path, data: Path | None,
                  val_data: Path | None, teacher_path: str, console: Console):
    """(training set, validation set or None) of token texts."""
    from bit_axon.inference import Sampler
    from bit_axon.io import atomic_write_text
    from bit_axon.training.distill_data import (
        chat_units,
        generate_teacher_texts,
        read_units,
        seed_prompts,
        split_held_out,
        texts_dataset,
    )

    if data is not None:
        units = read_units(data, tokenizer)
        name = str(data)
    else:
        total = config.generate_samples
        with console.status(f"The teacher writes {total} answers to {output_dir / 'teacher_text.jsonl'}") as status:
            chats = generate_teacher_texts(
                teacher, tokenizer, output_dir, samples=total, max_tokens=config.generate_max_tokens,
                temperature=config.generate_temperature, top_p=config.generate_top_p, seed=config.seed,
                teacher_id=teacher_path, prompts=seed_prompts(examples_dir()), make_sampler=Sampler,
                progress=lambda done, n: (status.update(f"The teacher writes its answers: {done}/{n}")
                                          if console.is_terminal else console.print(f"Teacher answers: {done}/{n}")),
            )
        name = str(output_dir / "teacher_text.jsonl")
        if val_data is None:
            # Held out by chat, and written out, so the held-out text can be scored again later.
            chats, held_out = split_held_out(chats, config.val_fraction, config.seed)
            atomic_write_text(output_dir / HELD_OUT_FILE,
                              "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in held_out))
            val_units = chat_units(held_out, tokenizer)
        units = chat_units(chats, tokenizer)
    if val_data is not None:
        train_units, val_units = units, read_units(val_data, tokenizer)
    elif data is not None:
        train_units, val_units = split_held_out(units, config.val_fraction, config.seed)
    else:
        train_units = units
    train = texts_dataset(train_units, config.max_seq_len, tokenizer, name)
    val = texts_dataset(val_units, config.max_seq_len, tokenizer, f"{name} (held out)") if val_units else None
    console.print(f"Text: {train.num_tokens} training tokens in {len(train)} pieces"
                  + (f", {val.num_tokens} held out" if val is not None else ""), highlight=False)
    return train, val


def save_student(model, student_dir: Path, output_dir: Path) -> Path:
    """The distilled student as a Bit-Axon model directory in ``output_dir`` (LoRA merged; ``save_model``
    carries the tokenizer files of the student's directory, ``model.source``)."""
    from bit_axon.loading import save_model
    from bit_axon.training.lora import adapter_layers
    from bit_axon.training.merging import merge_adapters

    if adapter_layers(model):
        merge_adapters(model)
    return save_model(model, output_dir)


def _recorded_run(output_dir: Path, inputs: dict[str, Any], flags: dict[str, Any], console: Console) -> dict[str, Any]:
    """The settings of the run being resumed, with the flags given on top (each change said)."""
    path = output_dir / RUN_FILE
    if not path.is_file():
        return flags
    recorded = json.loads(path.read_text())
    for key, value in inputs.items():
        if value is not None and str(value) != str(recorded["inputs"].get(key)):
            raise ValueError(f"--resume: this run was made with --{key.replace('_', '-')} {recorded['inputs'][key]}, "
                             f"not {value}; drop the option or start a new run in another -o")
    settings = dict(recorded["settings"])
    for key, value in flags.items():
        if settings.get(key) != value:
            console.print(f"--resume: {key} {settings.get(key)!r} -> {value!r}", highlight=False)
        settings[key] = value
    return settings


@settings_options(DistillConfig, DISTILL_FLAGS)
def distill(
    ctx: typer.Context,
    teacher: str = typer.Option(..., "--teacher", help="Teacher: an HF or Bit-Axon directory, a .gguf file or a hub id."),
    student: Path = typer.Option(..., "--student", help="Student: a Bit-Axon directory (bit-axon port-weights TEACHER)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Run directory; the distilled model is saved in OUT/model."),
    data: Path | None = typer.Option(None, "--data", help="Text: JSONL chats/Alpaca/{'text': ...} records or plain text "
                                     "(default: the teacher's own answers to seed prompts)."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Held-out text (default: a share of the text)."),
    no_thermal: bool = typer.Option(False, "--no-thermal", help="Disable thermal monitoring."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output-dir from its latest checkpoint."),
    **settings: Any,
) -> None:
    """Distill a teacher into a Bit-Axon student: KL(teacher || student) on next-token distributions."""
    from bit_axon.io import atomic_write_text
    from bit_axon.loading import load_model, load_tokenizer, model_source
    from bit_axon.training.cooling import build_cooling_scheduler
    from bit_axon.training.distill import DistillTrainer, prepare_student

    import mlx.core as mx
    from mlx.utils import tree_flatten

    console = Console(quiet=mx.distributed.init().rank() != 0)
    inputs = {"teacher": teacher, "student": student, "data": data, "val_data": val_data}
    with RunErrors(console, output_dir):
        flags = given_settings(ctx, DistillConfig, settings)
        check_run_dir(output_dir, resume=resume)
        chosen = _recorded_run(output_dir, inputs, flags, console) if resume else flags
        config = DistillConfig(**chosen)
        model_source(teacher)  # cheap checks first: the paths hold models, the text files exist
        model_source(student)
        for what, path in (("--data", data), ("--val-data", val_data)):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{what} {path}: file not found")
        check_output_dir(output_dir, inputs=[teacher, student], option="--output-dir", can_overwrite=False)
        with console.status(f"Loading the teacher {teacher} and the student {student}"):
            teacher_model = load_model(teacher)
            student_model = load_student(student)
        teacher_in_float(teacher_model, console)
        tokenizer = load_tokenizer(teacher)
        check_pair(teacher_model, student_model, tokenizer, load_tokenizer(student), teacher, str(student))
        output_dir.mkdir(parents=True, exist_ok=True)
        if mx.distributed.init().rank() == 0:
            record = {"inputs": {k: None if v is None else str(v) for k, v in inputs.items()}, "settings": config.to_dict()}
            atomic_write_text(output_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")
        train_set, val_set = distill_texts(config, teacher_model, tokenizer, output_dir, data, val_data, teacher, console)
        mx.random.seed(config.seed)
        wrapped = prepare_student(student_model, config.train_rest, config.adapter_config())
        trainable = sum(v.size for _, v in tree_flatten(student_model.trainable_parameters()))
        console.print(f"Training {trainable / 1e6:.1f}M parameters: SSM mixers, norms and routers in full"
                      + (f", LoRA rank {config.lora_rank} on {len(wrapped)} layers" if wrapped else "")
                      + (", everything else in full" if config.train_rest == "full" else ""), highlight=False)
        cooling = build_cooling_scheduler(not no_thermal, config.training_config(str(output_dir)).thermal_policy())
        trainer = DistillTrainer(
            student_model, teacher_model, config.training_config(str(output_dir)), train_set, val_set,
            cooling_scheduler=cooling, console=console, top_k=config.top_k, ce_weight=config.ce_weight,
        )
        try:
            result = trainer.train(resume=resume)
        finally:
            if cooling is not None:
                cooling.close()
        if not result.get("interrupted") and trainer.is_main:
            save_student(student_model, student, output_dir / MODEL_DIR)
    if result.get("interrupted"):
        command = ["bit-axon", "distill", "--teacher", teacher, "--student", str(student), "-o", str(output_dir),
                   "--resume"]
        console.print(f"Interrupted at step {result['step']}; checkpoint saved. Resume with: {shlex.join(command)}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    summary = {k: result[k] for k in ("step", "kl", "val_kl", "val_perplexity", "tokens_per_sec", "elapsed_sec")
               if result.get(k) is not None}
    console.print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()),
                  highlight=False)
    model_dir = output_dir / MODEL_DIR
    console.print(f"Distilled model: {model_dir} (bit-axon run -m {model_dir} \"...\")", highlight=False,
                  soft_wrap=True)

"""Distillation: a student learns the teacher's next-token distributions (``bit-axon distill``).

The loss at every position of the text is KL(teacher || student) between the two next-token
distributions, plus ``ce_weight`` times the cross-entropy on the text's own next token:

* ``top_k = 0``: over the full vocabulary, sum_v p(v) (log p(v) - log q(v)).
* ``top_k = k``: over the teacher's k most likely tokens and one more outcome, "any other token"
  (the tail), with the teacher's tail mass 1 - sum_topk p and the student's 1 - sum_topk q. That is
  the exact KL between the two distributions with the tail merged into one token: never above the
  full KL, equal to it when the teacher puts no mass outside its top k, and it still pushes the
  student's tail mass toward the teacher's (a plain top-k renormalisation would not).

The teacher runs in the same step, on the same packed batch (segment ids keep the examples apart
for it too), outside the compiled student step and without gradients. ``DistillTrainer`` is the
``Trainer`` with that batch and that loss: checkpoints with exact resume, thermal control,
metrics.jsonl, loss.png and data parallelism are the trainer's.

What trains (``prepare_student``): the SSM mixers (new layers, which replace attention) and every
norm and router in full; the rest (attention projections and the shared expert) by LoRA
(``train_rest="lora"``, the default), in full (``"full"``, with the routed experts too) or not at
all (``"frozen"``). The embedding (and the tied head) is the teacher's and stays frozen, as do the
routed experts under LoRA: they carry the teacher's MLPs, as "The Mamba in the Llama" keeps the
MLPs frozen while the new mixers learn. ``input_proj`` and ``output_proj`` (the port's fixed maps
in and out of the residual stream) stay frozen too (``_lora_rest``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from bit_axon.training.config import SettingError, TrainingConfig
from bit_axon.training.evaluation import perplexity
from bit_axon.training.lora import AdapterConfig, apply_adapters, lora_target
from bit_axon.training.losses import TargetBatch
from bit_axon.training.trainer import Trainer

import mlx.core as mx
import mlx.nn as nn

logger = logging.getLogger(__name__)

TRAIN_REST = ("lora", "full", "frozen")
# The student's tail mass 1 - sum_topk q is floored here before its log: float32 rounding can make
# the sum reach 1.
_MIN_TAIL = 1e-12


@dataclass(frozen=True)
class DistillConfig:
    """The settings of a distillation run that differ from a fine-tuning run's (``TrainingConfig``).

    ``training_config`` lays them over ``TrainingConfig``'s defaults for everything else (thermal
    thresholds, weight decay, clipping, ...). Text generation settings are for the teacher's own
    text, used when no data file is given.
    """

    top_k: int = 0  # 0: KL over the full vocabulary; k: the teacher's top k plus the merged tail
    ce_weight: float = 0.0  # weight of the cross-entropy on the text's next tokens
    train_rest: str = "lora"  # what trains besides the SSM mixers, norms and routers (TRAIN_REST)
    lora_rank: int = 16
    learning_rate: float = 3e-4
    warmup_steps: int = 20
    max_steps: int = 1000
    batch_size: int = 4
    max_seq_len: int = 256
    grad_accum_steps: int = 1
    save_every: int = 100
    eval_every: int = 100
    keep_checkpoints: int = TrainingConfig.keep_checkpoints
    max_eval_batches: int | None = None
    log_every: int = TrainingConfig.log_every
    seed: int = TrainingConfig.seed
    grad_checkpoint: bool = False
    val_fraction: float = 0.05  # of the text units held out for the validation KL (without --val-data)
    generate_samples: int = 256  # teacher answers to write when no data file is given
    generate_max_tokens: int = 256
    generate_temperature: float = 0.8
    generate_top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: the full vocabulary), got {self.top_k}")
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.train_rest not in TRAIN_REST:
            raise ValueError(f"train_rest must be one of {', '.join(TRAIN_REST)}, got {self.train_rest!r}")
        if self.generate_samples < 1 or self.generate_max_tokens < 1:
            raise ValueError("generate_samples and generate_max_tokens must be >= 1")
        if self.warmup_steps == DistillConfig.warmup_steps and 1 <= self.max_steps < self.warmup_steps:
            object.__setattr__(self, "warmup_steps", self.max_steps)  # a short run keeps the default's shape
        self.training_config(".")  # the trainer's own checks, named as the flags

    def training_config(self, output_dir: str) -> TrainingConfig:
        """The trainer's settings: these fields, a float LoRA (never DoRA) for ``train_rest="lora"``, no samples."""
        names = {f.name for f in dataclasses.fields(TrainingConfig)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        try:
            return TrainingConfig(**own, output_dir=output_dir, use_dora=False, quantize_mode="none", eval_samples=0)
        except SettingError as err:
            flag = f"--{err.field.replace('_', '-')}: " if err.field else ""
            raise ValueError(f"{flag}{err.problem}") from None

    def adapter_config(self) -> AdapterConfig:
        return self.training_config(".").adapter_config()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TeacherTargets(NamedTuple):
    """The teacher's log-probabilities at a batch's target positions.

    Full vocabulary: ``logprobs`` (K, V), ``ids`` and ``tail`` empty (0 columns). Top-k: ``ids``
    (K, k) token ids, ``logprobs`` (K, k), ``tail`` (K,) the log of the remaining mass.
    """

    logprobs: mx.array
    ids: mx.array
    tail: mx.array


class DistillBatch(NamedTuple):
    batch: TargetBatch
    teacher: TeacherTargets


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def target_logprobs(model: nn.Module, batch: TargetBatch) -> mx.array:
    """(K, V) next-token log-probabilities of ``model`` at the batch's target positions."""
    hidden = model.features(batch.inputs, segment_ids=batch.segment_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.positions]
    return _log_softmax(model.head(hidden))


def teacher_targets(teacher: nn.Module, batch: TargetBatch, top_k: int = 0) -> TeacherTargets:
    """The teacher's distributions for ``batch`` (evaluated), over the full vocabulary or its top ``top_k``."""
    logprobs = mx.stop_gradient(target_logprobs(teacher, batch))
    empty = mx.zeros((logprobs.shape[0], 0), dtype=mx.int32)
    if top_k == 0 or top_k >= logprobs.shape[-1]:
        targets = TeacherTargets(logprobs, empty, mx.zeros((logprobs.shape[0],)))
    else:
        ids = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[:, :top_k].astype(mx.int32)
        top = mx.take_along_axis(logprobs, ids, axis=-1)
        tail = mx.log(mx.maximum(1.0 - mx.exp(top).sum(axis=-1), _MIN_TAIL))
        targets = TeacherTargets(top, ids, tail)
    mx.eval(targets)
    return targets


def kl_rows(student: mx.array, teacher: TeacherTargets) -> mx.array:
    """(K,) KL(teacher || student) per position; ``student`` is the student's (K, V) log-probabilities."""
    if teacher.ids.shape[-1] == 0:
        return (mx.exp(teacher.logprobs) * (teacher.logprobs - student)).sum(axis=-1)
    top = mx.take_along_axis(student, teacher.ids, axis=-1)
    student_tail = mx.log(mx.maximum(1.0 - mx.exp(top).sum(axis=-1), _MIN_TAIL))
    kl_top = (mx.exp(teacher.logprobs) * (teacher.logprobs - top)).sum(axis=-1)
    return kl_top + mx.exp(teacher.tail) * (teacher.tail - student_tail)


def distill_loss_terms(
    model: nn.Module, batch: DistillBatch, ce_weight: float = 0.0
) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """(sum over positions of KL + ce_weight * CE, number of positions, {"kl": sum, "ce": sum})."""
    targets, teacher = batch
    student = target_logprobs(model, targets)
    weights = targets.weights.astype(mx.float32)
    kl = (kl_rows(student, teacher) * weights).sum()
    ce = (-mx.take_along_axis(student, targets.targets[:, None], axis=-1)[:, 0] * weights).sum()
    return kl + ce_weight * ce, weights.sum(), {"kl": kl, "ce": ce}


def _lora_rest(path: str) -> bool:
    """LoRA targets of ``train_rest="lora"``: attention and the shared expert; not the SSM mixers (they
    train in full), nor ``input_proj`` / ``output_proj``: their inputs are the raw residual stream,
    where a teacher's few very large coordinates turn Adam's first small steps into large jumps of
    the logits (measured: the KL went from 9.6 to 60 after one step of 2.5e-5 on SmolLM2)."""
    return lora_target(path) and ".ssm." not in path and path not in ("input_proj", "output_proj")


def prepare_student(model: nn.Module, train_rest: str = "lora", adapters: AdapterConfig | None = None) -> list[str]:
    """Choose what trains (the module docstring) on a Bit-Axon student, in place; returns the adapted paths."""
    if train_rest not in TRAIN_REST:
        raise ValueError(f"train_rest must be one of {', '.join(TRAIN_REST)}, got {train_rest!r}")
    wrapped: list[str] = []
    if train_rest == "lora":
        adapters = adapters or AdapterConfig(kind="lora")
        # Everything but the SSM mixers, which train in full.
        wrapped = apply_adapters(model, adapters, target=_lora_rest)
    else:
        model.freeze()
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        full_rest = train_rest == "full" and name in ("attention", "moe")
        if name in ("ssm", "gate", "shared_expert_gate") or isinstance(module, nn.RMSNorm) or full_rest:
            module.unfreeze()
    return wrapped


class DistillTrainer(Trainer):
    """``Trainer`` whose batches carry the teacher's distributions and whose loss is ``distill_loss_terms``.

    The teacher's distributions are computed when a batch is used (``with_teacher``), so skipping
    batches on resume costs no teacher passes. Validation reports ``val_kl``, ``val_ce`` and the
    student's perplexity on the text (``val_perplexity`` = exp(``val_ce``)); ``val_loss`` is the
    training loss (KL + ce_weight * CE), which the best weights and early stopping watch.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, *args: Any, top_k: int = DistillConfig.top_k,
                 ce_weight: float = DistillConfig.ce_weight, **kwargs: Any):
        self.teacher, self.top_k, self.ce_weight = teacher, top_k, ce_weight
        teacher.eval()
        teacher.freeze()
        super().__init__(model, *args, **kwargs)

    def with_teacher(self, batch: TargetBatch) -> DistillBatch:
        return DistillBatch(batch, teacher_targets(self.teacher, batch, self.top_k))

    def loss_terms(self, model: nn.Module, batch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
        if isinstance(batch, TargetBatch):  # a validation batch
            batch = self.with_teacher(batch)
        return distill_loss_terms(model, batch, self.ce_weight)

    def _build_step(self):
        student_step = super()._build_step()
        return lambda batch: student_step(self.with_teacher(batch))

    def progress_fields(self, metrics: dict[str, Any]) -> str:
        kl = metrics.get("kl")
        return "" if kl is None or not math.isfinite(kl) else f"kl {kl:.3f}"

    def evaluate(self, dataset=None) -> dict[str, float]:
        out = super().evaluate(dataset)
        if "val_ce" in out:
            out["val_perplexity"] = perplexity(out["val_ce"])
        return out

"""Trainer: the SFT loop, and the machinery ORPOTrainer shares (accumulation, clipping, schedule,
exact resume, signal handling, data parallelism across processes).

The loop runs steps and nothing else; what happens around them (cooling, evaluation, the metrics
file, the loss plot, checkpoints, early stopping, the non-finite-loss stop) are callbacks
(``bit_axon.training.callbacks``). Subclasses change *what* a batch is and how it is scored by
overriding ``batches``, ``loss_terms``, ``batch_tokens`` and ``progress_fields``.

The model is any ``nn.Module`` that ``loss_terms`` can score: for SFT, one with
``features(inputs, segment_ids=...)`` (hidden states), ``head(h)`` and ``output_head`` (the layer
behind ``head``), and optionally ``set_recompute(bool)``.

``TrainingConfig.epochs`` is resolved once, at init, into the number of steps that many passes
over the packed training set take (``bit_axon.training.epochs``): ``trainer.config`` is the run's
config with that ``max_steps``, so the loop, the schedule, checkpoints and resume see one number.
Every metrics record has ``epoch``, the passes made so far (``batches_consumed`` over the batches
of one pass), with or without ``epochs``.

A run stopped by Ctrl-C or SIGTERM saves a checkpoint but is not finished: it writes no final
adapter (``result["adapter_path"]`` is None, ``result["checkpoint"]`` the checkpoint to resume from,
``result["interrupted"]`` True); see ``callbacks.Checkpointing`` for the final adapter of an earlier
run found in ``output_dir``.

Under ``mlx.launch`` each process (rank) trains on its own shard of the batches and the ranks sum
their gradients and token counts before every update (see ``distributed``), so W processes with
batch size B follow the run of one process with batch size W * B. Only rank 0 reads checkpoints,
writes files and prints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from bit_axon.tokenizer import BaseTokenizer
from bit_axon.training.callbacks import (
    NO_TARGETS,
    BestAdapter,
    Callback,
    Checkpointing,
    Cooling,
    EarlyStopping,
    Evaluation,
    LossPlot,
    MetricsWriter,
    NonFiniteLossError,
    NonFiniteStop,
    step_was_skipped,
    write_failure,
)
from bit_axon.training.checkpoint import save_checkpoint
from bit_axon.training.collate import iterate_batches
from bit_axon.training.config import SettingError, TrainingConfig
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.distributed import agree_to_stop, all_sum_tree, broadcast_tree, check_same, shard
from bit_axon.training.epochs import packed_batches_per_epoch, steps_for_epochs
from bit_axon.training.evaluation import evaluate_loss, perplexity, sft_loss_terms
from bit_axon.training.losses import TargetBatch, gather_targets
from bit_axon.training.progress import StepProgress
from bit_axon.training.recovery import recover_unfinished
from bit_axon.training.resume import resume_latest
from bit_axon.training.run_scope import StopSignals, memory_limit
from bit_axon.training.samples import Generate, eval_samples_callback
from bit_axon.training.scheduler import cosine_with_warmup
from bit_axon.training.tracking import tracking_callbacks

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from rich.console import Console

__all__ = ["NonFiniteLossError", "Trainer"]

logger = logging.getLogger(__name__)

VAL_PREFIX = "val_"  # evaluate()'s keys


def _special_token_id(name: str, explicit: int | None, dataset: Any) -> int:
    """An explicit id wins, else the dataset's (the built-in datasets take theirs from the tokenizer)."""
    if explicit is not None:
        return explicit
    value = getattr(dataset, name, None)
    if value is None:
        raise ValueError(
            f"Trainer needs {name}: pass {name}=... or a dataset with an {name} attribute "
            "(SFTDataset, AlpacaDataset and ORPODataset take it from their tokenizer)"
        )
    return value


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig,
        dataset,
        val_dataset=None,
        cooling_scheduler=None,
        *,
        console: Console | None = None,
        show_progress: bool = True,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        callbacks: Sequence[Callback] = (),
        tokenizer: BaseTokenizer | None = None,
        generate: Generate | None = None,
    ):
        """``tokenizer`` and ``generate`` (``bit_axon.inference.generate``) turn on the samples at each
        evaluation (``bit_axon.training.samples``); without them a run has none."""
        self.model = model
        self.config = config
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.cooling = cooling_scheduler
        # One process per rank under mlx.launch; a plain run is a group of one that never communicates.
        self.group = mx.distributed.init()
        self.rank, self.world_size = self.group.rank(), self.group.size()
        self.console = (console or Console()) if self.is_main else Console(quiet=True)
        self.show_progress = show_progress and self.is_main
        self.eos_token_id = _special_token_id("eos_token_id", eos_token_id, dataset)
        self.pad_token_id = _special_token_id("pad_token_id", pad_token_id, dataset)
        self.batches_per_epoch = self.count_epoch_batches(dataset)
        config = self.config = self._resolve_epochs(config)
        if config.early_stopping_patience is not None and val_dataset is None:
            raise ValueError("--early-stopping-patience needs a validation set: pass --val-data "
                             "(early stopping watches val_loss)")
        self.output_dir = Path(config.output_dir)
        self.learning_rate_at = self.schedule()  # optimizer step (0-based) -> its learning rate
        self.optimizer = optim.AdamW(learning_rate=self.learning_rate_at, weight_decay=config.weight_decay)
        self.step = 0
        self.batches_consumed = 0
        self.nonfinite_steps = 0
        self.empty_steps = 0  # steps skipped because their batches had no target tokens
        self.tokens_seen = 0
        self.last_loss = math.nan  # of the last applied step: the loss a checkpoint records
        self.stop_reason: str | None = None
        self.signals = StopSignals(self._announce_stop)
        writer = MetricsWriter()
        self.history = writer.history
        self.best = BestAdapter()  # its step's checkpoint survives rotation (save_checkpoint)
        samples = eval_samples_callback(self, tokenizer, generate)
        patience = config.early_stopping_patience
        self.callbacks: list[Callback] = [
            NonFiniteStop(config.max_nonfinite_steps),
            *([Cooling(cooling_scheduler)] if cooling_scheduler is not None else []),
            Evaluation(config.eval_every),
            self.best,
            *([samples] if samples is not None else []),  # before the writer: samples go to metrics.jsonl
            writer,
            *tracking_callbacks(config.report_to),  # right after the writer: the record as written
            LossPlot(writer),
            Checkpointing(config.save_every),
            *([EarlyStopping(patience)] if patience is not None else []),
            *callbacks,
        ]
        if hasattr(model, "set_recompute"):
            model.set_recompute(config.grad_checkpoint)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reads and writes files and reports progress."""
        return self.rank == 0

    def _resolve_epochs(self, config: TrainingConfig) -> TrainingConfig:
        """``config``, with ``max_steps`` the steps of ``config.epochs`` passes when that is set."""
        if config.epochs is None:
            return config
        steps = steps_for_epochs(self.batches_per_epoch, config.grad_accum_steps, self.world_size, config.epochs)
        if config.max_steps not in (TrainingConfig.max_steps, steps):
            logger.warning("epochs=%d sets the run's length: max_steps=%d is ignored", config.epochs, config.max_steps)
        try:
            resolved = dataclasses.replace(config, max_steps=steps)
        except SettingError as err:
            raise SettingError(err.field, f"{err.problem} (epochs={config.epochs} makes {steps} steps of this "
                                          "training set)") from None
        self.console.print(f"epochs={config.epochs}: {self.batches_per_epoch} batches per epoch -> {steps} steps",
                           highlight=False)
        return resolved

    # ---- what subclasses override -------------------------------------------------------------
    def count_epoch_batches(self, dataset) -> int:
        """The batches of one pass over ``dataset`` (``bit_axon.training.epochs``)."""
        c = self.config
        return packed_batches_per_epoch(dataset, c.batch_size, c.max_seq_len, c.seed, self.eos_token_id, self.pad_token_id)

    def schedule(self):
        c = self.config
        return cosine_with_warmup(c.learning_rate, c.warmup_steps, c.max_steps)

    def batches(self, dataset, loop: bool) -> Iterator[TargetBatch]:
        c = self.config
        packed = iterate_batches(
            dataset, c.batch_size, c.max_seq_len, loop=loop, shuffle=loop, seed=c.seed,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        return (gather_targets(*batch) for batch in packed)

    def loss_terms(self, model: nn.Module, batch) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
        """(sum of losses, sum of weights, metric sums); the step loss is sum / weight."""
        return sft_loss_terms(model, batch)

    def batch_tokens(self, batch) -> int:
        """Real (non-padding) tokens in a batch, for tokens/s."""
        return int((batch.inputs != self.pad_token_id).sum().item())

    def progress_fields(self, metrics: dict[str, Any]) -> str:
        return ""

    # ---- one step ------------------------------------------------------------------------------
    def _build_step(self):
        """The compiled micro-step: loss terms and gradients of the summed loss for one batch."""
        model = self.model

        def loss(m, batch):
            loss_sum, weight, metrics = self.loss_terms(m, batch)
            return loss_sum, (weight, metrics)

        loss_and_grad = nn.value_and_grad(model, loss)

        def grad_step(batch):
            (loss_sum, (weight, metrics)), grads = loss_and_grad(model, batch)
            return loss_sum, weight, metrics, grads

        state = [model.state, mx.random.state]
        # The model state is an output too: value_and_grad swaps parameters in place while tracing.
        return partial(mx.compile, inputs=state, outputs=state)(grad_step)

    def _accumulate(self, grad_step, data: Iterator):
        totals = None
        loss_sum = mx.array(0.0)
        weight = mx.array(0.0)
        metric_sums: dict[str, mx.array] = {}
        tokens = 0
        for _ in range(self.config.grad_accum_steps):
            batch = next(data)
            self.batches_consumed += self.world_size  # a global position: every rank took one batch
            ls, w, metrics, grads = grad_step(batch)
            totals = grads if totals is None else tree_map(mx.add, totals, grads)
            loss_sum = loss_sum + ls
            weight = weight + w
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            mx.eval(totals, loss_sum, weight, metric_sums)
            tokens += self.batch_tokens(batch)
        if self.world_size > 1:
            # Sum over all ranks *before* normalising and clipping, so the update is the one for
            # the whole global batch, and identical on every rank.
            reduced = all_sum_tree((totals, loss_sum, weight, metric_sums, mx.array(tokens)), self.group)
            mx.eval(reduced)
            totals, loss_sum, weight, metric_sums, global_tokens = reduced
            tokens = int(global_tokens.item())
        return totals, loss_sum, weight, metric_sums, tokens

    def _apply(self, grads, loss_sum: mx.array, w: float) -> tuple[float, float, bool]:
        grads = tree_map(lambda g: g / w, grads)
        grads, norm = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        loss = (loss_sum / w).item()
        norm_value = norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm_value)):
            return loss, norm_value, False
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return loss, norm_value, True

    def _train_step(self, grad_step, data: Iterator) -> dict[str, Any]:
        """One optimizer step (``grad_accum_steps`` batches per rank); its metrics record."""
        c = self.config
        t0 = time.perf_counter()
        # Random draws (adapter dropout) are seeded per step, so a resumed run repeats exactly the
        # draws the uninterrupted run makes without storing RNG state; each rank draws its own
        # masks for its own rows (rank 0 keeps the one-process seeds).
        mx.random.seed(c.seed * 1_000_003 + self.step + (self.rank << 32))
        grads, loss_sum, weight, metric_sums, tokens = self._accumulate(grad_step, data)
        # The rate this step's update uses (the optimizer evaluates the schedule at its own step count).
        lr = float(self.learning_rate_at(self.optimizer.step).item())
        self.step += 1
        self.tokens_seen += tokens
        w = weight.item()
        empty = w == 0
        if empty:
            loss, grad_norm = math.nan, math.nan  # no update: NonFiniteStop says why, once
            self.empty_steps += 1
        else:
            loss, grad_norm, applied = self._apply(grads, loss_sum, w)
            if applied:
                self.last_loss = loss
            else:
                self.nonfinite_steps += 1
                logger.warning("step %d: non-finite loss/gradients (loss=%s); update skipped", self.step, loss)
        record: dict[str, Any] = {
            "step": self.step, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
            "tokens": tokens, "step_time": time.perf_counter() - t0, **self._throughput(),
            "epoch": self.batches_consumed / self.batches_per_epoch,
        }
        if empty:
            record.update({NO_TARGETS: True, "empty_steps": self.empty_steps})
        else:
            record.update({k: v.item() / w for k, v in metric_sums.items()})
        return record

    def _throughput(self) -> dict[str, float]:
        start_time, start_tokens = self._run_start
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        return {"tokens_per_sec": (self.tokens_seen - start_tokens) / elapsed, "peak_memory_gb": mx.get_peak_memory() / 1e9}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, dataset=None) -> dict[str, float]:
        """Weighted loss, perplexity and metrics over a validation set; ranks share its batches."""
        dataset = dataset if dataset is not None else self.val_dataset
        batches = self.batches(dataset, loop=False)
        if self.config.max_eval_batches is not None:
            batches = islice(batches, self.config.max_eval_batches)
        totals = evaluate_loss(self.model, batches, self.loss_terms, self.group)
        if totals.weight == 0:
            return {}
        out = {"loss": totals.loss, "perplexity": perplexity(totals.loss), **totals.metric_means()}
        return {VAL_PREFIX + k: v for k, v in out.items()}

    # ---- resume, state, stopping ---------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """What a checkpoint's ``training_state.json`` records besides step and loss."""
        c = self.config
        state = {
            "batches_consumed": self.batches_consumed, "nonfinite_steps": self.nonfinite_steps,
            "empty_steps": self.empty_steps,
            "tokens_seen": self.tokens_seen, "max_steps": c.max_steps,
            "learning_rate": float(self.optimizer.learning_rate.item()), "world_size": self.world_size,
            "batch_size": c.batch_size, "max_seq_len": c.max_seq_len, "seed": c.seed,
        }
        for callback in self.callbacks:
            state.update(callback.checkpoint_state())
        state["config"] = c.to_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        """A checkpoint of the current step (rank 0; None on the other ranks)."""
        if not self.is_main:
            return None
        recover_unfinished(self.output_dir)  # what a kill during an earlier save left
        try:
            return save_checkpoint(
                self.model, self.optimizer, self.step, self.last_loss, self.output_dir,
                extra_state=self.training_state(), keep=self.config.keep_checkpoints, protect=self.best.step,
            )
        except OSError as err:
            what = f"the checkpoint of step {self.step} in {self.output_dir}"
            raise write_failure(err, what, self.output_dir) from err

    def _sync_from_rank0(self) -> None:
        """Start every rank from rank 0's state: its checkpoint, or its fresh adapters.

        Rank 0 alone reads checkpoint files, so a second machine needs no copy of them; and the
        adapters' random initialisation need not be seeded alike on every machine.
        """
        c = self.config
        check_same({
            "training examples": len(self.dataset),
            "validation examples": len(self.val_dataset) if self.val_dataset is not None else 0,
            "batch size": c.batch_size,
            "gradient accumulation steps": c.grad_accum_steps,
            "max steps": c.max_steps,
            "max sequence length": c.max_seq_len,
            "seed": c.seed,
            "trainable parameters": sum(v.size for _, v in tree_flatten(self.model.trainable_parameters())),
        }, self.group)
        counters = [self.step, self.batches_consumed, self.nonfinite_steps, self.empty_steps, self.tokens_seen]
        counters = mx.array(counters, dtype=mx.int64)
        state = broadcast_tree(
            {"adapters": self.model.trainable_parameters(), "optimizer": self.optimizer.state, "counters": counters},
            self.group,
        )
        self.model.update(state["adapters"])
        self.optimizer.state = state["optimizer"]
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step, self.batches_consumed, self.nonfinite_steps, self.empty_steps, self.tokens_seen = (
            state["counters"].tolist()
        )

    def request_stop(self, reason: str) -> None:
        """Stop before the next step (a callback's graceful stop: the run saves and returns)."""
        self.stop_reason = reason

    def _stops_before_step(self) -> bool:
        """Run the before-step callbacks; True when the run stops here (on every rank alike).

        Raises the ``ThermalShutdownError`` of any rank, after the halt callbacks (a checkpoint).
        """
        # The flags as they stand before the callbacks: a signal arriving during a thermal check
        # (or a pause) lets this step run, like one arriving during the step.
        stop = self.signals.requested or self.stop_reason is not None
        hot = None
        if not stop:
            try:
                self._emit("on_step_begin", self.step + 1)
            except ThermalShutdownError as err:
                hot = err
        if self.world_size > 1:
            stop, hot = agree_to_stop(stop, hot, self.group, self.step + 1)
        if hot is not None:
            self._emit("on_halt", hot)
            raise hot
        if stop and self.stop_reason is None:
            self.signals.requested = True  # a signal here or on another rank
        return stop

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _announce_stop(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/yellow]", highlight=False)

    # ---- the loop ------------------------------------------------------------------------------
    def _begin(self, resume: bool) -> None:
        mx.random.seed(self.config.seed)
        self.optimizer.init(self.model.trainable_parameters())
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                resume_latest(self)
        if self.world_size > 1:
            self._sync_from_rank0()
        self.model.train()
        self.last_loss = math.nan
        mx.reset_peak_memory()
        self._run_start = (time.perf_counter(), self.tokens_seen)

    def train(self, resume: bool = False) -> dict[str, Any]:
        self._begin(resume)
        # This rank's batches, from the data position of a resumed run on.
        data = shard(self.batches(self.dataset, loop=True), self.rank, self.world_size, start=self.batches_consumed)
        grad_step = self._build_step()
        result: dict[str, Any] = {"step": self.step, "loss": math.nan, "grad_norm": math.nan}
        progress = StepProgress(self.console, self.show_progress, self.progress_fields, self.config.log_every)
        with self.signals.installed(), memory_limit(self.config.memory_limit_gb):
            with progress.shown(total=self.config.max_steps, completed=self.step):
                self._emit("on_train_begin")
                while self.step < self.config.max_steps and not self._stops_before_step():
                    record = self._train_step(grad_step, data)
                    self._emit("on_step_end", record)
                    skipped = step_was_skipped(record)
                    result.update({k: v for k, v in record.items() if not skipped or k.startswith(VAL_PREFIX)})
                    progress.update(record)
            self._emit("on_train_end", result)
        if self.signals.requested:
            self.console.print(
                f"[yellow]Stopped at step {self.step}; checkpoint saved in {self.output_dir}. "
                "Run the same command with --resume to continue.[/yellow]", soft_wrap=True,
            )
        elif self.stop_reason is not None:
            self.console.print(f"[yellow]Stopped at step {self.step} ({self.stop_reason}).[/yellow]")
        elapsed = time.perf_counter() - self._run_start[0]
        result.update(
            step=self.step, **self._throughput(), nonfinite_steps=self.nonfinite_steps, empty_steps=self.empty_steps,
            interrupted=self.signals.requested, stop_reason=self.stop_reason, elapsed_sec=elapsed,
        )
        return result

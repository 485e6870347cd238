"""Trainer: the SFT loop, and the machinery ORPOTrainer shares (accumulation, clipping, schedule,
checkpoints with exact resume, signal handling, thermal hooks, progress and metrics, data
parallelism across processes).

Subclasses change *what* a batch is and how it is scored by overriding ``batches``,
``loss_terms``, ``batch_tokens`` and ``progress_fields``; everything else is common.

Under ``mlx.launch`` each process (rank) trains on its own shard of the batches and the ranks sum
their gradients and token counts before every update (see ``distributed``), so W processes with
batch size B follow the run of one process with batch size W * B. Only rank 0 reads checkpoints,
writes files and prints.
"""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from bit_axon.io import atomic_write_bytes
from bit_axon.training.checkpoint import (
    get_latest_checkpoint,
    load_checkpoint,
    read_training_state,
    save_adapter_only,
    save_checkpoint,
)
from bit_axon.training.collate import iterate_batches
from bit_axon.training.config import TrainingConfig
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.distributed import all_sum_tree, broadcast_tree, check_same, gather_rows, shard
from bit_axon.training.losses import TargetBatch, gather_targets, target_loss
from bit_axon.training.packing import EOS_TOKEN_ID, PAD_TOKEN_ID

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)

FINAL_ADAPTER = "final_adapter.safetensors"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class NonFiniteLossError(RuntimeError):
    pass


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
        eos_token_id: int = EOS_TOKEN_ID,
        pad_token_id: int = PAD_TOKEN_ID,
    ):
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
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.output_dir = Path(config.output_dir)
        self.optimizer = optim.AdamW(learning_rate=self.schedule(), weight_decay=config.weight_decay)
        self.step = 0
        self.batches_consumed = 0
        self.nonfinite_steps = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self._stop_requested = False
        if hasattr(model, "set_recompute"):
            model.set_recompute(config.grad_checkpoint)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reads and writes files and reports progress."""
        return self.rank == 0

    # ---- what subclasses override -------------------------------------------------------------
    def schedule(self):
        from bit_axon.training.scheduler import cosine_with_warmup

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
        loss_sum, ntok = target_loss(model, batch)
        return loss_sum, ntok, {}

    def batch_tokens(self, batch) -> int:
        """Real (non-padding) tokens in a batch, for tokens/s."""
        return int((batch.inputs != self.pad_token_id).sum().item())

    def progress_fields(self, metrics: dict[str, Any]) -> str:
        return ""

    # ---- the loop ------------------------------------------------------------------------------
    def _build_step(self):
        """The compiled micro-step: loss terms and gradients of the summed loss for one batch."""
        model = self.model

        def loss(m, batch):
            loss_sum, weight, metrics = self.loss_terms(m, batch)
            return loss_sum, (weight, metrics)

        loss_and_grad = nn.value_and_grad(model, loss)

        def grad_step(*arrays):
            (loss_sum, (weight, metrics)), grads = loss_and_grad(model, self._batch_type(*arrays))
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
            self._batch_type = type(batch)
            ls, w, metrics, grads = grad_step(*batch)
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

    def _apply(self, grads, loss_sum: mx.array, weight: mx.array) -> tuple[float, float, bool]:
        w = weight.item()
        if w == 0:
            logger.warning("step %d: no target tokens in the accumulated batches; update skipped", self.step)
            return float("nan"), 0.0, False
        grads = tree_map(lambda g: g / w, grads)
        grads, norm = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        loss = (loss_sum / w).item()
        norm_value = norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm_value)):
            return loss, norm_value, False
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return loss, norm_value, True

    def evaluate(self, dataset=None) -> dict[str, float]:
        """Token-weighted loss and perplexity over a validation set; ranks share its batches."""
        dataset = dataset if dataset is not None else self.val_dataset
        self.model.eval()
        loss_sum = weight = 0.0
        metric_sums: dict[str, float] = {}

        def add(batch, scale: float = 1.0) -> None:
            nonlocal loss_sum, weight
            ls, w, metrics = self.loss_terms(self.model, batch)
            mx.eval(ls, w, metrics)
            loss_sum += scale * ls.item()
            weight += scale * w.item()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + scale * v.item()

        batches = self.batches(dataset, loop=False)
        if self.config.max_eval_batches is not None:
            batches = islice(batches, self.config.max_eval_batches)
        first = None
        evaluated = 0
        for i, batch in enumerate(batches):
            first = batch if first is None else first
            if i % self.world_size == self.rank:
                add(batch)
                evaluated += 1
        if self.world_size > 1:
            if not evaluated and first is not None:
                # Fewer batches than ranks: score one anyway, weighted 0, so this rank sends the
                # same metric names to the sum as the others.
                add(first, scale=0.0)
            sums = all_sum_tree((mx.array(loss_sum), mx.array(weight), tree_map(mx.array, metric_sums)), self.group)
            loss_sum, weight = sums[0].item(), sums[1].item()
            metric_sums = {k: v.item() for k, v in sums[2].items()}
        self.model.train()
        if weight == 0:
            return {}
        val_loss = loss_sum / weight
        out = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}
        out.update({f"val_{k}": v / weight for k, v in metric_sums.items()})
        return out

    def _resume(self) -> None:
        """Load the latest checkpoint (rank 0 only: the others receive it in ``_sync_from_rank0``)."""
        latest = get_latest_checkpoint(self.output_dir)
        if latest is None:
            self.console.print(f"No checkpoint in {self.output_dir}; starting from step 0.")
            return
        self.step, _ = load_checkpoint(self.model, self.optimizer, latest)
        state = read_training_state(latest)
        self.batches_consumed = state.get("batches_consumed", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        if self.cooling is not None and "total_pause_time" in state:
            self.cooling.restore_totals(state)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            # batches_consumed counts global batches, so the data position carries over exactly;
            # only the number of rows per step changes.
            self.console.print(
                f"[yellow]{latest} was written by {saved_world} process(es), this run has {self.world_size}: "
                f"continuing from the same data position, but each step now takes {self.world_size} x "
                f"{self.config.grad_accum_steps} batches of {self.config.batch_size} instead of {saved_world} x "
                f"{self.config.grad_accum_steps}.[/yellow]"
            )
        changed = [
            f"{name} {state[key]} -> {value}"
            for key, name, value in (
                ("batch_size", "batch size", self.config.batch_size),
                ("max_seq_len", "max sequence length", self.config.max_seq_len),
                ("seed", "seed", self.config.seed),
            )
            if key in state and state[key] != value
        ]
        if changed:
            # The packed batches, and their shuffled order, depend on all three: batch
            # ``batches_consumed`` of the new order is not where the old run stopped.
            self.console.print(
                f"[yellow]{latest} was written with a different {', '.join(changed)}: the batches are "
                f"made differently now, so resuming after {self.batches_consumed} of them repeats some "
                f"examples and skips others.[/yellow]"
            )
        metrics_file = self.output_dir / METRICS_FILE
        if metrics_file.exists():
            self.history = [
                rec for rec in map(json.loads, metrics_file.read_text().splitlines()) if rec.get("step", 0) <= self.step
            ]
            self._write_metrics_file()
        self.console.print(f"Resumed from {latest} (step {self.step}).")

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
        counters = mx.array([self.step, self.batches_consumed, self.nonfinite_steps, self.tokens_seen], dtype=mx.int64)
        state = broadcast_tree(
            {"adapters": self.model.trainable_parameters(), "optimizer": self.optimizer.state, "counters": counters},
            self.group,
        )
        self.model.update(state["adapters"])
        self.optimizer.state = state["optimizer"]
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step, self.batches_consumed, self.nonfinite_steps, self.tokens_seen = state["counters"].tolist()

    def _agree_to_stop(
        self, stop: bool, hot: ThermalShutdownError | None
    ) -> tuple[bool, ThermalShutdownError | None]:
        """Every rank's stop request and thermal stop, so that all ranks stop before the same step.

        A rank that left the loop alone would leave the others waiting in the next gradient sum.
        """
        rows = gather_rows(
            [float(stop), float(hot is not None), hot.temperature if hot else 0.0, hot.stop_temp if hot else 0.0],
            self.group,
        )
        if hot is None:
            hottest = max(rows, key=lambda row: (row[1], row[2]))
            if hottest[1]:
                hot = ThermalShutdownError(hottest[2], hottest[3], self.step + 1)
        return any(row[0] for row in rows), hot

    def _checkpoint(self, loss: float) -> Path | None:
        if not self.is_main:
            return None
        extra = {
            "batches_consumed": self.batches_consumed,
            "nonfinite_steps": self.nonfinite_steps,
            "tokens_seen": self.tokens_seen,
            "max_steps": self.config.max_steps,
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "max_seq_len": self.config.max_seq_len,
            "seed": self.config.seed,
        }
        if self.cooling is not None:
            extra.update(self.cooling.status())
        return save_checkpoint(
            self.model, self.optimizer, self.step, loss, self.output_dir,
            extra_state=extra, keep=self.config.keep_checkpoints,
        )

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_metrics_file(self) -> None:
        from bit_axon.io import atomic_write_text

        atomic_write_text(self.output_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))

    def plot_losses(self) -> Path | None:
        if not self.is_main:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        if not train and not val:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = self.output_dir / LOSS_PLOT
        atomic_write_bytes(path, buf.getvalue())
        return path

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.console.print(
                f"[yellow]{signal.Signals(signum).name}: finishing step {self.step + 1}, "
                "then saving a checkpoint (press Ctrl-C again to abort now).[/yellow]"
            )

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def train(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        mx.random.seed(c.seed)
        self.optimizer.init(self.model.trainable_parameters())
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._resume()
            elif (self.output_dir / METRICS_FILE).exists():
                (self.output_dir / METRICS_FILE).unlink()
        if self.world_size > 1:
            self._sync_from_rank0()
        self.model.train()
        # This rank's batches, from the data position of a resumed run on.
        data = shard(self.batches(self.dataset, loop=True), self.rank, self.world_size, start=self.batches_consumed)
        grad_step = self._build_step()
        previous_handlers = self._install_signal_handlers()
        previous_limit = None if c.memory_limit_gb is None else mx.set_memory_limit(int(c.memory_limit_gb * 1e9))
        mx.reset_peak_memory()
        start_time = time.perf_counter()
        start_tokens = self.tokens_seen
        result: dict[str, Any] = {"step": self.step, "loss": float("nan"), "grad_norm": float("nan")}
        last_saved = self.step
        consecutive_nonfinite = 0
        progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=self.console, disable=not self.show_progress, transient=False,
        )
        try:
            with progress:
                task = progress.add_task("train", total=c.max_steps, completed=self.step, info="")
                while self.step < c.max_steps:
                    # The flag as it stands before the thermal check: a signal arriving during the
                    # check (or a pause) lets this step run, like one arriving during the step.
                    stop = self._stop_requested
                    hot = None
                    if self.cooling is not None and not stop:
                        try:
                            self.cooling.check_before_step(self.step + 1)
                        except ThermalShutdownError as err:
                            hot = err
                    if self.world_size > 1:
                        stop, hot = self._agree_to_stop(stop, hot)
                    if hot is not None:
                        if self.step > last_saved:
                            path = self._checkpoint(result["loss"])
                            self.console.print(f"[red]Thermal stop: checkpoint saved to {path}[/red]")
                        raise hot
                    if stop:
                        self._stop_requested = True
                        break
                    t0 = time.perf_counter()
                    # Random draws (adapter dropout) are seeded per step, so a resumed run repeats
                    # exactly the draws the uninterrupted run makes without storing RNG state; each
                    # rank draws its own masks for its own rows (rank 0 keeps the one-process seeds).
                    mx.random.seed(c.seed * 1_000_003 + self.step + (self.rank << 32))
                    grads, loss_sum, weight, metric_sums, tokens = self._accumulate(grad_step, data)
                    lr = float(self.optimizer.learning_rate.item())
                    loss, grad_norm, applied = self._apply(grads, loss_sum, weight)
                    self.step += 1
                    self.tokens_seen += tokens
                    if not applied:
                        self.nonfinite_steps += 1
                        consecutive_nonfinite += 1
                        logger.warning("step %d: non-finite loss/gradients (loss=%s); update skipped", self.step, loss)
                        if consecutive_nonfinite >= c.max_nonfinite_steps:
                            raise NonFiniteLossError(
                                f"{consecutive_nonfinite} consecutive steps had non-finite loss or gradients "
                                f"(last at step {self.step}); stopping. Try a lower --learning-rate; the last good "
                                f"checkpoint in {self.output_dir} is intact."
                            )
                    else:
                        consecutive_nonfinite = 0
                    step_time = time.perf_counter() - t0
                    if self.cooling is not None:
                        self.cooling.after_step(step_time)
                    w = max(weight.item(), 1e-9)
                    elapsed = time.perf_counter() - start_time
                    record: dict[str, Any] = {
                        "step": self.step, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
                        "tokens": tokens, "step_time": step_time,
                        "tokens_per_sec": (self.tokens_seen - start_tokens) / max(elapsed, 1e-9),
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                    record.update({k: v.item() / w for k, v in metric_sums.items()})
                    if self.cooling is not None:
                        record.update(self.cooling.status())
                    if applied:
                        result.update(record)
                    if c.eval_every and self.step % c.eval_every == 0 and self.val_dataset is not None:
                        evaluation = self.evaluate()
                        record.update(evaluation)
                        result.update(evaluation)
                    self._log(record)
                    if "val_loss" in record:
                        self.plot_losses()
                    if self.step % c.save_every == 0:
                        self._checkpoint(result["loss"])
                        last_saved = self.step
                    progress.update(task, completed=self.step, info=self._progress_text(record))
            if self.step > last_saved:
                self._checkpoint(result["loss"])
        finally:
            for sig, old in previous_handlers.items():
                signal.signal(sig, old)
            if previous_limit is not None:
                mx.set_memory_limit(previous_limit)
        if self._stop_requested:
            self.console.print(
                f"[yellow]Stopped at step {self.step}; checkpoint saved in {self.output_dir}. "
                "Run the same command with --resume to continue.[/yellow]"
            )
        adapter_path = self.output_dir / FINAL_ADAPTER
        if self.is_main:
            save_adapter_only(self.model, adapter_path)
        self.plot_losses()
        elapsed = time.perf_counter() - start_time
        result.update(
            step=self.step,
            tokens_per_sec=(self.tokens_seen - start_tokens) / max(elapsed, 1e-9),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            nonfinite_steps=self.nonfinite_steps,
            interrupted=self._stop_requested,
            elapsed_sec=elapsed,
            adapter_path=str(adapter_path),
        )
        if self.cooling is not None:
            result.update(self.cooling.status())
        return result

    def _progress_text(self, record: dict[str, Any]) -> str:
        text = (
            f"loss {record['loss']:.4f} lr {record['learning_rate']:.2e} "
            f"{record['tokens_per_sec']:.0f} tok/s {record['peak_memory_gb']:.2f} GB"
        )
        if record.get("temperature") is not None:
            text += f" {record['temperature']:.0f}°C"
        if record.get("total_pause_time"):
            text += f" paused {record['total_pause_time']:.0f}s"
        if "val_loss" in record:
            text += f" val {record['val_loss']:.4f}"
        extra = self.progress_fields(record)
        return f"{text} {extra}" if extra else text

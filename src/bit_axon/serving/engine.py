"""Continuous batching: many generation requests on one model, one forward pass per step.

One worker thread owns every MLX call. A request is prefilled alone as soon as it arrives, then
its caches join its model's running batch (``batching.join``); each step decodes one token for
every row of each model's batch, and a finished or cancelled request's rows leave it at once.
Requests never share cache state: each row is its own sequence, with its own sampler and seed, so
a request's output does not depend on what else runs beside it (up to floating-point rounding).

Requests come from any thread (``Engine.submit``) and their events go to a callback the caller
gives; the server turns those into asyncio queue puts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bit_axon.inference.detokenizer import StreamingDetokenizer
from bit_axon.inference.generate import DEFAULT_PREFILL_STEP, prefill
from bit_axon.inference.sampling import Sampler
from bit_axon.serving import batching

import mlx.core as mx
import mlx.nn as nn

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ServedModel:
    """A model the server answers for under its own id (a base alone, or a base with an adapter)."""

    name: str
    model: nn.Module
    tokenizer: Any
    context_length: int


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    message: str = ""  # why, for reason "error"
    seconds_to_first_token: float = 0.0


Event = Delta | Finished


class StopText:
    """Cuts a stream of text at the first occurrence of any stop string, holding back what could be
    the start of one: everything ``feed`` returns is final, and the stop string itself never shows."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass(eq=False)
class Job:
    """One request in flight. ``cancel()`` (any thread) frees its row at the next step."""

    request: GenerationRequest
    emit: Callable[[Event], None]
    served: ServedModel
    sampler: Sampler
    detokenizer: StreamingDetokenizer
    stop_text: StopText
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Batch:
    """The running rows of one model (row i is jobs[i]): their caches, and the token each row feeds
    at the next step. ``inputs`` may still be computing; ``handed[i]`` says whether row i's input
    token has already gone to its client (a row's first token does, at its prefill)."""

    jobs: list[Job] = field(default_factory=list)
    cache: list[Any] | None = None
    inputs: mx.array | None = None  # (rows,) token ids
    handed: list[bool] = field(default_factory=list)
    batched: bool = True  # False: the model's caches cannot batch, and its one row runs alone

    def has_room(self, max_batch: int) -> bool:
        return not self.jobs or (self.batched and len(self.jobs) < max_batch)

    def clear(self) -> None:
        self.jobs, self.cache, self.inputs, self.handed, self.batched = [], None, None, [], True

    def keep(self, rows: list[int]) -> None:
        self.jobs = [self.jobs[i] for i in rows]
        self.handed = [self.handed[i] for i in rows]
        if not self.jobs:
            # Nothing may stay in flight once the worker goes idle: MLX's CPU backend can deadlock
            # at interpreter exit while an async_eval runs (as generate_step notes).
            mx.eval(self.inputs)
            self.clear()
            return
        self.inputs = self.inputs[mx.array(rows, dtype=mx.int32)]
        if self.batched:
            self.cache = batching.keep_rows(self.cache, rows)


class Engine:
    """Serves ``models`` (by id) from one worker thread, at most ``max_batch`` rows per model.

    Use as a context manager, or ``start()`` / ``close()``.
    """

    def __init__(self, models: Sequence[ServedModel], max_batch: int = 16, prefill_step_size: int = DEFAULT_PREFILL_STEP):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.models = {m.name: m for m in models}
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self._incoming: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._batches: dict[str, _Batch] = {name: _Batch() for name in self.models}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._sequential_logged: set[str] = set()
        self.largest_batch = 0  # the most rows one decode step has run so far

    # --- the caller's side ---------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bit-axon-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None and not self._closed:
            self._closed = True
            self._incoming.put(None)
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Job:
        """Queue ``request``; ``emit`` is called (from the worker thread) with its ``Delta``s, then
        one ``Finished``. Raises ``KeyError`` for an unknown model and ``ValueError`` for a request
        that cannot run (checked here, before it is queued)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        served = self.models[request.model]
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: generation needs at least one token")
        if len(request.prompt_ids) >= served.context_length:
            raise ValueError(
                f"the prompt is {len(request.prompt_ids)} tokens; model {served.name!r} reads at most "
                f"{served.context_length} (prompt and reply together): shorten the prompt"
            )
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        job = Job(
            request=request,
            emit=emit,
            served=served,
            sampler=Sampler(temperature=request.temperature, top_p=request.top_p, seed=request.seed),
            detokenizer=StreamingDetokenizer(served.tokenizer),
            stop_text=StopText(request.stop),
        )
        self._incoming.put(job)
        return job

    @property
    def active(self) -> int:
        """Requests decoding now (rows of the running batches)."""
        return sum(len(b.jobs) for b in self._batches.values())

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self._waiting and not any(b.jobs for b in self._batches.values())
            if not self._take_incoming(block=idle):
                return
            self._admit()
            for name, batch in self._batches.items():
                if batch.jobs:
                    self._guarded(name, batch, self._step)

    def _take_incoming(self, block: bool) -> bool:
        """Move queued requests to the waiting list; False once ``close()`` was called."""
        try:
            job = self._incoming.get(block=block)
            while True:
                if job is None:
                    self._fail_all("the server is shutting down")
                    return False
                self._waiting.append(job)
                job = self._incoming.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        """Prefill waiting requests whose model's batch has room, and add them to it."""
        still_waiting = []
        for job in self._waiting:
            batch = self._batches[job.request.model]
            if job.cancelled:
                self._finish(job, "cancelled")
            elif not batch.has_room(self.max_batch):
                still_waiting.append(job)
            else:
                try:
                    self._prefill(job, batch)
                except Exception as error:  # noqa: BLE001  (it must reach the client, not kill the worker)
                    # The prompt ran on its own caches: the running batch is untouched.
                    logger.exception("Generation failed on model %s", job.request.model)
                    self._finish(job, "error", _failure(error))
        self._waiting = still_waiting

    def _guarded(self, name: str, batch: _Batch, work: Callable[[str, _Batch], None]) -> None:
        """Run ``work`` on ``batch``; a failure ends its requests with an error and the server goes on."""
        try:
            work(name, batch)
        except Exception as error:  # noqa: BLE001  (it must reach the clients, not kill the worker)
            logger.exception("Generation failed on model %s", name)
            for job in batch.jobs:
                self._finish(job, "error", _failure(error))
            batch.clear()

    def _prefill(self, job: Job, batch: _Batch) -> None:
        """Run ``job``'s prompt on caches of its own, take its first token and add it to ``batch``."""
        model = job.served.model
        prompt = mx.array(list(job.request.prompt_ids), dtype=mx.int32)[None]
        cache = model.make_cache()
        prefill(model, prompt[:, :-1], cache, self.prefill_step_size)
        logits, _ = model(prompt[:, -1:], cache=cache)
        token = job.sampler(logits[:, -1, :])
        mx.eval(token, batching.states(cache))
        job.first_token_at = time.perf_counter()
        if not self._take_token(job, token.item()):
            return  # done at its first token: it never joins
        if batching.batchable(cache):
            batch.cache = batching.join(batch.cache, cache)
        else:
            if job.served.name not in self._sequential_logged:
                logger.warning("Model %s has caches that cannot be batched: its requests run one at a time",
                               job.served.name)
                self._sequential_logged.add(job.served.name)
            batch.cache, batch.batched = cache, False
        batch.jobs.append(job)
        batch.handed.append(True)
        batch.inputs = token if batch.inputs is None else mx.concatenate([batch.inputs, token])

    def _step(self, name: str, batch: _Batch) -> None:
        model = self.models[name].model
        # Rows cancelled since the last step leave before it runs.
        self._drop(batch, [j for j in batch.jobs if j.cancelled], reason="cancelled")
        if not batch.jobs:
            return
        self.largest_batch = max(self.largest_batch, len(batch.jobs))
        # Queue this step, then hand out the tokens it feeds while it runs: building the next
        # graph and detokenizing overlap the computation. A row that ends on a handed-out token
        # has had one step computed for nothing, and leaves.
        logits, _ = model(batch.inputs[:, None], cache=batch.cache)
        logits = logits[:, -1, :]
        if all(job.sampler.greedy for job in batch.jobs):
            tokens = mx.argmax(logits, axis=-1)
        else:  # each row draws from its own sampler (its own seed and settings)
            tokens = mx.concatenate([job.sampler(logits[i : i + 1]) for i, job in enumerate(batch.jobs)])
        mx.async_eval(tokens, batching.states(batch.cache))
        fed, handed = batch.inputs.tolist(), batch.handed
        batch.inputs, batch.handed = tokens, [False] * len(batch.jobs)
        done = [job for job, token, was_handed in zip(batch.jobs, fed, handed, strict=True)
                if not was_handed and not self._take_token(job, token)]
        self._drop(batch, done)

    def _take_token(self, job: Job, token: int) -> bool:
        """Hand ``token`` to ``job``'s client; False when the job is finished with it."""
        tokenizer = job.served.tokenizer
        if token in tokenizer.stop_token_ids:
            self._finish(job, "stop")
            return False
        job.completion_tokens += 1
        text = job.stop_text.feed(job.detokenizer.add_token(token))
        if text:
            job.emit(Delta(text))
        if job.stop_text.stopped:
            self._finish(job, "stop")
            return False
        total = len(job.request.prompt_ids) + job.completion_tokens
        if job.completion_tokens >= job.request.max_tokens or total >= job.served.context_length:
            self._finish(job, "length")
            return False
        return True

    def _finish(self, job: Job, reason: FinishReason, message: str = "") -> None:
        if reason in ("stop", "length"):
            tail = job.stop_text.feed(job.detokenizer.finalize()) + job.stop_text.flush()
            if tail:
                job.emit(Delta(tail))
        first = (job.first_token_at - job.submitted) if job.first_token_at is not None else 0.0
        job.emit(Finished(reason, len(job.request.prompt_ids), job.completion_tokens, message, first))

    def _drop(self, batch: _Batch, jobs: list[Job], reason: FinishReason | None = None) -> None:
        if not jobs:
            return
        for job in jobs:
            if reason is not None:
                self._finish(job, reason)
        batch.keep([i for i, job in enumerate(batch.jobs) if job not in jobs])

    def _fail_all(self, message: str) -> None:
        for job in self._waiting:
            self._finish(job, "error", message)
        for batch in self._batches.values():
            for job in batch.jobs:
                self._finish(job, "error", message)
            batch.clear()


def _failure(error: Exception) -> str:
    return f"generation failed: {type(error).__name__}: {error}"

"""Concurrent requests of one replica batched into one generation call, with token streaming.

* ``Batcher`` (asyncio, the replica's event loop): requests queue up; a single loop takes up to
  ``max_batch_size`` rows (a request is 1 row, or ``n`` rows when sampling with ``n > 1``) and runs them as one
  batch on a dedicated generation thread, so the event loop keeps accepting requests and writing streams
  meanwhile. Requests that arrive while a batch runs form the next batch (static batching: a batch runs to the
  end of its longest row; no row joins a running batch). Before a batch starts, the batcher waits until as many
  rows are queued as were in flight when the previous batch ended (its rows plus those queued meanwhile), at
  most a quarter of the previous batch's time, and no longer than ``batch_wait_timeout_s`` between two arrivals
  once the first has come: the clients of a finished batch usually come straight back, and without the wait the load splits
  into two half batches taking turns. A lone client (concurrency 1) never waits.
* ``HFStreamingBackend`` (transformers): one ``model.generate`` per batch on the ``HFEngine``'s model with the
  engine's exact generation config, where every row keeps its own sampling params: its own temperature and
  top-p (the engine's seeded sampler, applied per (temperature, top-p) group of rows), seed, ``max_tokens`` and
  stop strings (a per-row stopping criterion). Rows with different params therefore share a batch. The same
  criterion sees every new token of every row and streams the row's new text right away (real token-by-token
  SSE). A row's tokens, text, ``completion_tokens`` and ``finish_reason`` follow ``HFEngine``'s rule (the one
  :mod:`zephyr_ray.generation.stopping` rule, from ``HFEngine.stop_rule``; only public engine API is used), and its
  sampling seed is ``row_seed(seed, sample, prompt ids)`` as in the engine, so a request gets the same
  completion as ``HFEngine.generate`` on its conversation with the same params and adapter (greedy: token-exact
  in any batch; sampled: up to float rounding across batch shapes, see ``generation/hf.py``). Rows of different
  LoRA adapters (``Job.adapter``) and of the base share the batch: peft runs each row's own adapter
  (``generation/adapters.py``). Greedy requests with
  ``n > 1`` decode once and copy, as the engine does. A cancelled request (client gone) stops its rows at the
  next step.
* ``EngineBackend`` (any ``Engine``, e.g. vLLM's offline engine): requests with equal sampling params are
  grouped into one ``engine.generate`` call; a stream gets each completion as one chunk.

Streaming text: after each token only the newest tokens are decoded (incremental detokenization with a few
tokens of context, as in TGI/vLLM); the stream carries the new text, holding back an incomplete UTF-8 character
(U+FFFD) and any tail that could be the start of a stop string; the final event flushes the rest of the row's
text, which is always the full decode (as ``HFEngine`` writes it). The joined deltas equal the non-streamed text
for tokenizers whose decoding is prefix-stable (byte-level BPE, SentencePiece); otherwise a warning is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from zephyr_ray.generation.hf import HFEngine, processor_classes, row_seed
from zephyr_ray.generation.stopping import LENGTH, STOP, StopRule
from zephyr_ray.generation.types import Completion, Conversation, SamplingParams

log = logging.getLogger(__name__)


def post(events: list[tuple[Job, tuple]]) -> None:
    """Hand events from the generation thread to their jobs' asyncio queues: one wake-up per event loop for the
    whole list (a decode step of a batch posts once, not once per row)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Job, tuple]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class Job:
    """One request on its way through the batcher. Its events, ``("delta", choice, text)``,
    ``("finish", choice, Completion)`` and ``("error", None, exception)``, reach ``events`` (an asyncio queue of
    the request's loop) from the generation thread through ``post``. ``adapter``: the LoRA adapter (served name)
    that generates it, None = the base model."""

    def __init__(self, conversation: Conversation, prompt_ids: list[int], params: SamplingParams, stream: bool,
                 loop: asyncio.AbstractEventLoop | None = None, adapter: str | None = None):
        self.conversation, self.prompt_ids, self.params, self.stream = conversation, prompt_ids, params, stream
        self.adapter = adapter
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    @property
    def rows(self) -> int:
        return self.params.n if self.params.temperature > 0 else 1

    def delta(self, index: int, text: str) -> None:
        post([(self, ("delta", index, text))])

    def finish(self, index: int, completion: Completion) -> None:
        post([(self, ("finish", index, completion))])

    def fail(self, exc: BaseException) -> None:
        post([(self, ("error", None, exc))])

    async def event_batches(self, interval: float | Callable[[], float] = 0.0):
        """The job's events in lists: the first event as soon as it comes, then at most one list per ``interval``
        seconds (a number, or a function asked before each list), what arrives in between merged, except that a
        finish or an error goes out at once."""
        loop = asyncio.get_running_loop()
        last = -float("inf")
        while True:
            events = [await self.events.get()]
            deadline = last + (interval() if callable(interval) else interval)
            while True:
                while not self.events.empty():
                    events.append(self.events.get_nowait())
                left = deadline - loop.time()
                if left <= 0 or any(kind != "delta" for kind, _, _ in events):
                    break
                try:
                    events.append(await asyncio.wait_for(self.events.get(), left))
                except asyncio.TimeoutError:
                    break
            last = loop.time()
            yield events


@dataclass
class BatcherStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    max_rows: int = 0
    failed_batches: int = 0
    busy_s: float = 0.0
    # Rows of the latest batches, oldest first.
    recent_rows: list[int] = field(default_factory=list)


class Batcher:
    """Groups queued ``Job``s into batches of at most ``max_rows`` rows and runs ``run_batch(jobs)`` on one
    generation thread. ``run_batch`` reports results through the jobs' callbacks; an exception it raises fails
    every job of that batch (their requests get HTTP 500) and the loop goes on with the next batch."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_rows: int = 16, wait_s: float = 0.01,
                 thread_init: Callable[[], None] | None = None):
        self.run_batch, self.max_rows, self.wait_s = run_batch, max(1, max_rows), wait_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate", initializer=thread_init)
        self.pending: deque[Job] = deque()
        self.stats = BatcherStats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._expected = 0
        self._ended = 0.0
        self._last_s = 0.0

    @property
    def error(self) -> BaseException | None:
        """Why the batching loop died (None while it runs or has not started)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return self._task.exception() or RuntimeError("the batching loop exited")
        return None

    def submit(self, job: Job) -> None:
        if self._task is None or self._task.done():
            if self.error is not None:
                raise RuntimeError(f"the batching loop died: {self.error!r}")
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self.pending.append(job)
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _queued_rows(self) -> int:
        return sum(j.rows for j in self.pending if not j.cancelled)

    def _take(self) -> list[Job]:
        batch, rows = [], 0
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft()
                continue
            if batch and rows + job.rows > self.max_rows:
                break
            batch.append(self.pending.popleft())
            rows += job.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            if loop.time() - self._ended > max(1.0, 10 * self.wait_s):
                self._expected = 1  # traffic paused: the previous batch's clients are not coming back at once
            if self.wait_s > 0 and self._expected > 1:
                # Gather for at most a quarter of the last batch's time: the first returning client may take a
                # round trip, later ones must follow each other within wait_s.
                deadline = loop.time() + max(self.wait_s, 0.25 * self._last_s)
                queued = self._queued_rows()
                first = True
                while queued < self._expected and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left if first else min(left, self.wait_s))
                    except asyncio.TimeoutError:
                        break
                    now = self._queued_rows()
                    first = first and now == queued
                    queued = now
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self.executor, self.run_batch, batch)
            except Exception as exc:  # the server lives on; only this batch's requests fail
                log.exception("generation failed for a batch of %d requests", len(batch))
                self.stats.failed_batches += 1
                for job in batch:
                    job.fail(exc)
            s = self.stats
            s.batches += 1
            s.requests += len(batch)
            rows = sum(j.rows for j in batch)
            s.rows += rows
            s.max_rows = max(s.max_rows, rows)
            s.recent_rows = [*s.recent_rows[-15:], rows]
            self._last_s = time.perf_counter() - started
            s.busy_s += self._last_s
            # The rows now in flight: this batch's (its clients may come straight back) and those that queued up
            # meanwhile. The next batch waits for that many (at most wait_s): no ping-pong between two half batches.
            self._expected = min(self.max_rows, rows + self._queued_rows())
            self._ended = loop.time()


# ------------------------------------------------------------------------------------------------ text


@dataclass(eq=False)
class Row:
    """One decoded sequence of a batch: a request's sample ``sample`` (reported as ``indices``)."""

    job: Job
    sample: int
    indices: list[int]
    seed: int
    tokens: list[int] = field(default_factory=list)
    # Incremental detokenization: the text so far, and the token offsets it was last decoded from.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: str = ""
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.job.params


# ------------------------------------------------------------------------------------------------ transformers


class HFStreamingBackend:
    """Runs a batch of jobs as one ``model.generate`` call on an ``HFEngine``'s model (see the module doc)."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._rules: dict[tuple[str, ...], StopRule] = {}

    def rule(self, stops: list[str]) -> StopRule:
        """The engine's ending rule for these stop strings (one per distinct list)."""
        key = tuple(stops)
        if key not in self._rules:
            self._rules[key] = self.engine.stop_rule(list(stops))
        return self._rules[key]

    def __call__(self, jobs: list[Job]) -> None:
        rows: list[Row] = []
        for job in jobs:
            p = job.params
            if p.temperature > 0:
                rows += [Row(job, j, [j], row_seed(p.seed, j, job.prompt_ids)) for j in range(p.n)]
            else:
                rows.append(Row(job, 0, list(range(p.n)), row_seed(p.seed, 0, job.prompt_ids)))
        engine = self.engine
        ids, mask = engine.left_pad([r.job.prompt_ids for r in rows])
        width = ids.shape[1]
        processors = LogitsProcessorList()
        if any(r.params.temperature > 0 for r in rows):
            processors.append(_row_sampler_cls()(rows))
        tracker = _tracker_cls()(self, rows, width)
        config = engine.generation_config(max(r.params.max_new_tokens for r in rows))
        with torch.inference_mode():  # rows of different LoRA adapters share the batch (peft's mixed batch)
            engine.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  logits_processor=processors, stopping_criteria=StoppingCriteriaList([tracker]),
                                  **engine.adapter_selection([r.job.adapter for r in rows]))
        out: list[tuple[Job, tuple]] = []
        for row in rows:  # generate ended (every row is normally finished by the tracker already)
            if not row.done:
                self.finish(row, LENGTH, out)
        post(out)

    def step(self, row: Row, token: int, out: list[tuple[Job, tuple]]) -> bool:
        """Take the row's new token (its events go to ``out``); True when the row is finished."""
        p = row.params
        if row.job.cancelled:
            row.done = True
            return True
        rule = self.rule(p.stop)
        row.tokens.append(token)
        if rule.is_eos(token):
            self.finish(row, STOP, out)
        elif len(row.tokens) >= p.max_new_tokens:
            self.finish(row, LENGTH, out)
        elif row.job.stream or p.stop:
            # Decode only the newest tokens: the text of tokens[prefix_offset:] minus that of
            # tokens[prefix_offset:read_offset] (a few tokens of context keep word boundaries right).
            decode = self.tokenizer.decode
            before = decode(row.tokens[row.prefix_offset:row.read_offset], skip_special_tokens=True)
            after = decode(row.tokens[row.prefix_offset:], skip_special_tokens=True)
            new = after[len(before):] if len(after) > len(before) and after.startswith(before) else ""
            if rule.stop_in(row.text + new):
                self.finish(row, STOP, out)
            elif new and not new.endswith("\ufffd"):  # else wait: an incomplete UTF-8 character
                row.text += new
                row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)
                if row.job.stream:
                    safe = row.text[:len(row.text) - rule.hold(row.text)]
                    if len(safe) > len(row.emitted):
                        out += [(row.job, ("delta", i, safe[len(row.emitted):])) for i in row.indices]
                        row.emitted = safe
        return row.done

    def finish(self, row: Row, reason: str, out: list[tuple[Job, tuple]]) -> None:
        """End the row by the engine's rule: ``reason`` ``stop`` when its last token was an EOS or completed a
        stop string, ``length`` when it reached its limit (or the batch ended)."""
        row.done = True
        end = self.rule(row.params.stop).end(row.tokens, len(row.tokens) if reason == STOP else None)
        text = end.text
        if row.job.stream and len(text) > len(row.emitted):
            if text.startswith(row.emitted):
                out += [(row.job, ("delta", i, text[len(row.emitted):])) for i in row.indices]
            else:  # a tokenizer whose decoding is not prefix-stable; the stream cannot take text back
                log.warning("streamed text is not a prefix of the final text (request %s)", id(row.job))
        row.emitted = text
        completion = Completion(text=text, prompt_tokens=len(row.job.prompt_ids),
                                completion_tokens=end.completion_tokens, finish_reason=end.finish_reason)
        out += [(row.job, ("finish", i, completion)) for i in row.indices]


_CLASSES: dict[str, type] = {}
_CLASSES_LOCK = threading.Lock()


def _row_sampler_cls() -> type:
    """A logits processor applying the engine's ``SeededSampler`` per (temperature, top_p) group of rows."""
    with _CLASSES_LOCK:
        if "sampler" not in _CLASSES:
            seeded = processor_classes()[0]

            class RowSampler(LogitsProcessor):
                def __init__(self, rows: list[Row]):
                    groups: dict[tuple[float, float], list[int]] = {}
                    for i, r in enumerate(rows):
                        if r.params.temperature > 0:
                            groups.setdefault((r.params.temperature, r.params.top_p), []).append(i)
                    self.groups = [(torch.tensor(idx), seeded([rows[i].seed for i in idx], t, p))
                                   for (t, p), idx in groups.items()]

                def __call__(self, input_ids, scores):
                    out = scores.clone()
                    for idx, sampler in self.groups:
                        idx = idx.to(scores.device)
                        out[idx] = sampler(input_ids[idx], scores[idx])
                    return out

            _CLASSES["sampler"] = RowSampler
        return _CLASSES["sampler"]


def _tracker_cls() -> type:
    """A stopping criterion that feeds every new token to ``HFStreamingBackend.step``."""
    with _CLASSES_LOCK:
        if "tracker" not in _CLASSES:
            class RowTracker(StoppingCriteria):
                def __init__(self, backend: HFStreamingBackend, rows: list[Row], prompt_len: int):
                    self.backend, self.rows, self.prompt_len = backend, rows, prompt_len

                def __call__(self, input_ids, scores, **kwargs):
                    last = input_ids[:, -1].tolist()
                    out: list[tuple[Job, tuple]] = []
                    stop = [row.done or self.backend.step(row, token, out) for row, token in zip(self.rows, last)]
                    post(out)
                    return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

            _CLASSES["tracker"] = RowTracker
        return _CLASSES["tracker"]


# ------------------------------------------------------------------------------------------------ any engine


class EngineBackend:
    """Any ``Engine``: jobs with equal sampling params share one ``generate`` call; a stream gets each
    completion as a single chunk."""

    def __init__(self, engine: Any):
        self.engine = engine

    def __call__(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            p = job.params
            groups.setdefault(astuple(SamplingParams(p.temperature, p.top_p, p.max_new_tokens, [], p.seed, p.n))
                              + tuple(p.stop), []).append(job)
        for group in groups.values():
            live = [j for j in group if not j.cancelled]
            if not live:
                continue
            outs = self.engine.generate([j.conversation for j in live], live[0].params)
            events: list[tuple[Job, tuple]] = []
            for job, completions in zip(live, outs, strict=True):
                for i, c in enumerate(completions):
                    if job.stream and c.text:
                        events.append((job, ("delta", i, c.text)))
                    events.append((job, ("finish", i, c)))
            post(events)

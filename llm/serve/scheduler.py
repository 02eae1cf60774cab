"""Continuous batching: a bounded queue of jobs, admitted into the running batch at step boundaries.

One engine thread loops: drop cancelled jobs (freeing their blocks), admit waiting jobs while the
batch has room (max_batch rows), no preempted row is waiting to be recomputed, and the pool's free
blocks hold the new prompts with a block to spare for each running row (blocks are taken as rows grow,
not reserved for max_tokens; when the pool runs short the engine preempts the newest rows), run one
`Engine.step` (every decode + prefill chunks, one forward pass), retire finished rows and free their
blocks at once. The HTTP side submits from its event loop and reads events from an asyncio.Queue.
The engine thread collects a step's events (stamped with the time each token was sampled) and hands them
over once per step: one `loop.call_soon_threadsafe` per event loop, whose callback does the per-token
bookkeeping (throughput, TTFT and ITL metrics) and fills the jobs' queues on the loop's side. One wake-up of
the HTTP thread per step instead of one per token keeps the engine thread from handing the GIL over between
every row's token (bench_serve --profile measures both threads).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from llm.serve.engine import Engine, Event, Seq
from llm.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue holds max_queue jobs."""


class ShuttingDown(Exception):
    """Admission has stopped (SIGTERM)."""


@dataclass
class Job:
    """One HTTP request: its seqs (choices), where its events go, its timings."""

    seqs: list[Seq]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_tok: dict[int, float] = field(default_factory=dict)
    cancelled: bool = False
    failed: bool = False

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.pool = engine.pool
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.accepting = True
        self._stop = False
        self._cond = threading.Condition()
        self.metrics = Metrics(lambda: len(self.waiting), lambda: len(self.running), lambda: self.pool.used,
                               self.pool.n_blocks, counters=self._counters)
        self._thread = threading.Thread(target=self._loop, name="llm-serve-engine", daemon=True)
        self._out: list[tuple[Job, int, Event, float]] = []  # this step's events, handed over by _flush

    def start(self) -> None:
        self._thread.start()

    def _counters(self) -> dict[str, tuple[str, float]]:
        e = self.engine
        return {"llm_prefix_cache_queries": ("prompt tokens looked up in the prefix cache", e.prefix_queried),
                "llm_prefix_cache_hits": ("prompt tokens found in the prefix cache (their prefill skipped)",
                                          e.prefix_hits),
                "llm_preemptions": ("rows preempted (blocks freed, recomputed later) when the KV pool ran short",
                                    e.preemptions)}

    # ------------------------------------------------------------------ called from the event loop

    def submit(self, seqs: list[Seq]) -> Job:
        """Queue a job (429 / 503 upstream when full / shutting down); its events arrive on job.queue."""
        job = Job(seqs, asyncio.get_running_loop())
        for i, s in enumerate(seqs):
            s.emit = lambda ev, i=i: self._emit(job, i, ev)
        with self._cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job at the next step boundary (client gone); its blocks are freed there."""
        with self._cond:
            if not job.done:
                job.cancelled = True
                self._cond.notify()

    def worst_case_blocks(self, seqs: list[Seq]) -> int:
        """Pool blocks the seqs take at most (a prefix's shared blocks not counted: `engine.usable_blocks` is the
        most there are)."""
        return sum(self.engine.own_blocks(s.worst_case_tokens()) for s in seqs)

    def idle(self) -> bool:
        with self._cond:
            return not self.waiting and not self.running

    def stop_admission(self) -> None:
        with self._cond:
            self.accepting = False

    def shutdown(self, timeout: float) -> None:
        """Stop admission, let running and queued jobs finish for up to `timeout` s, cancel the rest, stop."""
        self.stop_admission()
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self.waiting or self.running) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for job in list(self.waiting) + self.running:
                job.cancelled = True
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread

    def _emit(self, job: Job, i: int, ev: Event) -> None:
        """Engine thread: keep the event (and when it happened) for this step's hand-over."""
        self._out.append((job, i, ev, time.perf_counter()))

    def _flush(self) -> None:
        """Engine thread, after a step: hand its events to their event loops, one call per loop."""
        if not self._out:
            return
        out, self._out = self._out, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in out:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

    def _deliver(self, items: list[tuple[Job, int, Event, float]]) -> None:
        """Event loop: per-token metrics (at the times the tokens were sampled), then each job's queue."""
        for job, i, ev, now in items:
            if ev.token is not None:
                self.metrics.count_tokens(1)
                if job.t_first is None:
                    job.t_first = now
                    self.metrics.observe("ttft", now - job.t_submit)
                if i in job.t_tok:
                    self.metrics.observe("itl", now - job.t_tok[i])
                job.t_tok[i] = now
            job.queue.put_nowait((i, ev))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.running:
                    self._cond.wait(0.5)
                self._drop_cancelled()
                if self._stop and not self.running:
                    self._flush()
                    return
                self._admit()
                batch = [s for job in self.running for s in job.seqs if s.finish is None]
            try:
                self.engine.step(batch)
            except Exception as e:  # noqa: BLE001 - a failed step fails its batch, never the server
                self._fail(f"{type(e).__name__}: {e}")
            self._flush()
            with self._cond:
                self._retire()
                self._cond.notify_all()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
            self._close(job, "cancelled")
        for job in [j for j in self.running if j.cancelled]:
            for s in job.seqs:
                if s.finish is None:
                    s.finish = "cancelled"
                    s.emit(Event(finish="cancelled"))
            self._retire_job(job, "cancelled")

    def _admit(self) -> None:
        live = [s for j in self.running for s in j.seqs if s.finish is None]
        if any(s.length < s.known - 1 and s.preemptions for s in live):
            return  # a preempted row is waiting for blocks: it goes first
        rows, spare = sum(len(j.seqs) for j in self.running), self.pool.free - len(live)
        while self.waiting:  # queued jobs are still admitted while draining after SIGTERM
            job = self.waiting[0]
            need = sum(self.engine.own_blocks(len(s.prompt) + 1) for s in job.seqs)
            if rows + len(job.seqs) > self.max_batch or (need > spare and rows > 0):
                break
            self.waiting.popleft()
            for s in job.seqs:
                self.engine.start(s)
                self.metrics.prompt_tokens.inc(len(s.prompt))
            self.running.append(job)
            rows, spare = rows + len(job.seqs), spare - need

    def _retire(self) -> None:
        for job in list(self.running):
            for s in job.seqs:
                if s.finish is not None and s.blocks:
                    self.engine.release(s)  # freed the step it finished, not when the whole job ends
            if job.done:
                self._retire_job(job, "error" if job.failed else "ok")

    def _retire_job(self, job: Job, outcome: str) -> None:
        for s in job.seqs:
            self.engine.release(s)
        self.running.remove(job)
        self.metrics.requests.labels(outcome=outcome).inc()
        if outcome == "ok":
            self.metrics.observe("latency", time.perf_counter() - job.t_submit)

    def _close(self, job: Job, reason: str) -> None:
        for s in job.seqs:
            s.finish = reason
            s.emit(Event(finish=reason))
        self.metrics.requests.labels(outcome=reason).inc()

    def _fail(self, message: str) -> None:
        with self._cond:
            for job in self.running:
                job.failed = True
                for s in job.seqs:
                    if s.finish is None:
                        s.finish = "error"
                        s.emit(Event(finish="error", error=message))

"""Documents -> token ids on worker processes, in order: the tokenizing step of `llm.data.shards.prepare`.

The main process reads the documents (one reader, so the order and the resume point are those of a
single process) and cuts them into chunks; `Encoder.map` keeps up to 2 x workers chunks in flight on a
process pool and yields the results in submission order. A worker turns a chunk of n documents into
`Encoded`: one flat array of ids (each document's ids followed by <|endoftext|>, in the shard dtype) and the
n document lengths. The ids do not depend on the number of workers, so neither do the shards
(tests/test_prep_workers.py).

Why processes: tiktoken's batch encoder runs each document's BPE on a thread with the GIL released, but
turning the ids into Python ints and then into arrays happens under the GIL, one thread at a time
(benchmarks/bench_tokenize.py measures both). A worker process does all of that on its own core.

Workers import only this module, numpy, tiktoken and llm.tokenizer, never torch (so nothing here imports
llm.runtime or llm.data.sources). They start by fork on Linux (nothing is re-imported, the tokenizer is
inherited) and by spawn elsewhere (the tokenizer is pickled once per worker).
They ignore SIGINT (Ctrl-C stops the main process, which shuts the pool down) and exit within PARENT_POLL_S
when the main process is gone (after a kill -9 they would otherwise wait on its pipes forever). One worker,
or a corpus of one chunk, encodes in the calling process with no pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from llm.tokenizer import Tokenizer

PROGRESS_S = 5.0  # seconds between progress lines of a preparation
PARENT_POLL_S = 0.5  # how often a worker checks that its main process is alive
# fork on Linux (no re-import, nothing pickled); spawn elsewhere (macOS offers fork, but it is unsafe there)
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
Meta = TypeVar("Meta")


@dataclass
class Encoded:
    """A chunk of n documents, tokenized."""

    ids: np.ndarray  # (sum(lengths),) every document's ids, each followed by eot_id, in the shard dtype
    lengths: np.ndarray  # (n,) int64 tokens per document, its eot included
    n_bytes: int  # UTF-8 bytes of the chunk's text (for MB/s)


def encode_docs(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> Encoded:
    """Tokenize `texts` one after another on this thread (ids as `tok.encode`, plain text: no special tokens)."""
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    n_bytes = 0
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        flat.extend(ids)
        flat.append(tok.eot_id)
        lengths[i] = len(ids) + 1
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
    return Encoded(np.array(flat, dtype=dtype), lengths, n_bytes)


_worker: tuple[Tokenizer, np.dtype] | None = None  # a worker process's tokenizer and shard dtype


def _init_worker(tok: Tokenizer, dtype: np.dtype, parent: int) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _worker = (tok, dtype)


def _exit_with(parent: int) -> None:
    """A worker whose main process was killed (kill -9, out of memory) would wait on its pipes forever: exit."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> Encoded:
    tok, dtype = _worker
    return encode_docs(tok, texts, dtype)


class Encoder:
    """Tokenizes chunks of documents on `workers` processes (1: in this process); results in input order.

    Use as a context manager: leaving it shuts the pool down (pending chunks are cancelled).
    """

    def __init__(self, tok: Tokenizer, dtype: np.dtype, workers: int, start_method: str | None = None) -> None:
        self.tok, self.dtype, self.workers = tok, np.dtype(dtype), workers
        self.start_method = start_method or START_METHOD
        self.pool: ProcessPoolExecutor | None = None
        self.used = 1  # processes that tokenized: `workers` once a pool started

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self.pool = None

    def map(self, chunks: Iterable[tuple[Meta, list[str]]]) -> Iterator[tuple[Meta, Encoded]]:
        """(meta, texts) -> (meta, Encoded), in order; reads at most 2 x workers chunks ahead of the consumer.

        An error reading `chunks` comes after the results of every chunk read before it (so they can be
        committed). The pool starts with the second chunk: a one-chunk corpus is encoded here.
        """
        pending: deque = deque()  # (meta, Future, or texts not yet submitted)
        it = iter(chunks)
        while True:
            try:
                meta, texts = next(it)
            except StopIteration:
                break
            except Exception:  # reading failed: hand out what was read before, then the error
                while pending:
                    yield self._result(pending.popleft())
                raise
            if self.workers <= 1:
                yield meta, encode_docs(self.tok, texts, self.dtype)
                continue
            if self.pool is None and pending:
                self._start()
                pending = deque((m, self._submit(t)) for m, t in pending)
            pending.append((meta, self._submit(texts) if self.pool is not None else texts))
            if len(pending) >= 2 * self.workers:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _start(self) -> None:
        self.pool = ProcessPoolExecutor(self.workers, mp.get_context(self.start_method),
                                        initializer=_init_worker, initargs=(self.tok, self.dtype, os.getpid()))
        self.used = self.workers

    def _submit(self, texts: list[str]) -> Future:
        return self.pool.submit(_encode_in_worker, texts)

    def _result(self, item: tuple) -> tuple:
        meta, job = item  # a worker that died raises BrokenProcessPool here
        return meta, (encode_docs(self.tok, job, self.dtype) if isinstance(job, list) else job.result())


class Meter:
    """Throughput of a preparation: a progress line through `log` at most every PROGRESS_S seconds, and a summary.

    `total` (bytes of all the text, when the source knows it) adds the share done and an ETA to the line; `done`
    is what earlier runs of a resumed preparation did (it counts in the share, not in the rates).
    """

    def __init__(self, log: Callable[[str], None], total: int | None = None, done: int = 0,
                 every: float = PROGRESS_S) -> None:
        self.log, self.total, self.done, self.every = log, total, done, every
        self.t0 = self.last = time.perf_counter()
        self.n_bytes = self.tokens = self.docs = 0

    def add(self, n_bytes: int, tokens: int, docs: int) -> None:
        self.n_bytes, self.tokens, self.docs = self.n_bytes + n_bytes, self.tokens + tokens, self.docs + docs
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            dt = now - self.t0
            where = f"{self.n_bytes / 1e6:,.1f} MB"
            if self.total:  # counting earlier runs' part too
                done = min(self.done + self.n_bytes, self.total)
                eta = (self.total - done) / max(self.n_bytes / dt, 1e-9)
                where = (f"{done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({done / self.total:.0%}, "
                         f"ETA {_duration(eta)})")
            self.log(f"tokenizing: {where}, {self.tokens:,} tokens, {self.docs:,} documents | {self._rates(dt)} "
                     f"| {dt:.0f} s")

    def _rates(self, dt: float) -> str:
        dt = max(dt, 1e-9)
        return f"{self.n_bytes / 1e6 / dt:,.2f} MB/s, {self.tokens / dt:,.0f} tokens/s"

    def summary(self, workers: int) -> str:
        """The closing line: MB, documents, tokens, seconds, MB/s, tokens/s and the processes that tokenized."""
        dt = time.perf_counter() - self.t0
        how = f"{workers} worker processes" if workers > 1 else "1 process"
        return (f"tokenized {self.n_bytes / 1e6:,.1f} MB ({self.docs:,} documents) into {self.tokens:,} tokens "
                f"in {dt:.1f} s: {self._rates(dt)} on {how}")


def _duration(s: float) -> str:
    """'42 s', '3m05s', '2h07m'."""
    s = int(s)
    return f"{s} s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"

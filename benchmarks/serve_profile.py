"""Where the serving engine thread's time goes under load (`bench_serve --profile`).

Wraps one Engine's methods with timers that read both the wall clock and the calling thread's CPU clock
(`time.thread_time`): with one torch thread (OMP_NUM_THREADS=1) the model's compute runs on the engine thread
itself, so for each part of a step

    wall - thread CPU = time the engine thread was runnable but not running: waiting for the GIL
                        (the asyncio HTTP loop, the load's SSE framing and JSON) or descheduled by the OS.

Parts of `Engine.step` (nested parts are subtracted from their parent, so the rows add up to the step):
  plan      scheduling: which rows, block allocation, prefix-cache lookups
  forward   the model call (one ragged forward)
  sample    batched sampling and logprobs, grammar masks
  detok     text: the row's TextStream (token bytes -> UTF-8 text, stop strings)
  emit      handing events to the HTTP side (metrics, loop.call_soon_threadsafe)
  step other  the rest of Engine.step (the loop over adapters, building the ragged batch, counting tokens)
and the CPU seconds of every thread of the server process over the run (/proc/self/task/*/stat), by thread name
(llm-serve-engine: the scheduler loop, Engine.step inside it; llm-serve-http: the asyncio loop with uvicorn,
the routes, tokenization and SSE framing).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

PARTS = ("plan", "forward", "sample", "detok", "emit")


class StepProfile:
    """Accumulates (wall, thread CPU) seconds per part of the engine thread's work."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.rows = 0
        self._stack: list[list[float]] = []  # per open part: [child wall, child cpu]

    @contextmanager
    def part(self, name: str):
        w0, c0 = time.perf_counter(), time.thread_time()
        self._stack.append([0.0, 0.0])
        try:
            yield
        finally:
            dw, dc = time.perf_counter() - w0, time.thread_time() - c0
            child = self._stack.pop()
            self.wall[name] += dw - child[0]
            self.cpu[name] += dc - child[1]
            if self._stack:
                self._stack[-1][0] += dw
                self._stack[-1][1] += dc

    def install(self, engine, tok) -> None:
        """Wrap the engine's parts (instance attributes shadow the methods; the model's __call__ through a proxy)."""
        prof = self

        def timed(name: str, fn):
            def wrapper(*a, **k):
                with prof.part(name):
                    return fn(*a, **k)
            return wrapper

        step = engine.step

        def step_wrapper(seqs):
            prof.steps += 1
            prof.rows += sum(s.finish is None for s in seqs)
            with prof.part("step other"):
                return step(seqs)

        engine.step = step_wrapper
        engine.plan = timed("plan", engine.plan)
        engine._sample_all = timed("sample", engine._sample_all)
        engine._prompt_logprobs = timed("sample", engine._prompt_logprobs)

        class Timed:
            def __init__(self, m) -> None:
                self.m = m

            def __call__(self, *a, **k):
                with prof.part("forward"):
                    return self.m(*a, **k)

            def __getattr__(self, name):
                return getattr(self.m, name)

        engine.model = Timed(engine.model)  # the eager ragged forward (a --compile'd step is not timed apart)
        engine.tok = _TimedTok(tok, prof)
        start = engine.start

        def start_wrapper(s):
            start(s)
            emit = s.emit
            s.emit = timed("emit", emit)
            s.text = _TimedText(s.text, prof)

        engine.start = start_wrapper


class _TimedTok:
    """The tokenizer with decode_bytes timed as detokenization."""

    def __init__(self, tok, prof: StepProfile) -> None:
        self.tok, self.prof = tok, prof

    def decode_bytes(self, ids):
        with self.prof.part("detok"):
            return self.tok.decode_bytes(ids)

    def __getattr__(self, name):
        return getattr(self.tok, name)


class _TimedText:
    def __init__(self, text, prof: StepProfile) -> None:
        self.text, self.prof = text, prof

    def push(self, data: bytes) -> str:
        with self.prof.part("detok"):
            return self.text.push(data)

    def close(self) -> str:
        with self.prof.part("detok"):
            return self.text.close()

    def __getattr__(self, name):
        return getattr(self.text, name)


def thread_cpu(names: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of this process, by name (names: native id -> name; the rest
    are summed as "other threads")."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[names.get(int(task.name), "other threads")] += (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_names() -> dict[int, str]:
    """Native id -> name of this process's Python threads."""
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def report(prof: StepProfile, wall: float, cpu0: dict[str, float], cpu1: dict[str, float], tokens: int) -> list[dict]:
    """Rows: per part, ms per step of wall and thread CPU and their gap; then per thread CPU seconds."""
    rows = []
    steps = max(1, prof.steps)
    total_w = sum(prof.wall.values())
    for name in (*PARTS, "step other"):
        w, c = prof.wall.get(name, 0.0), prof.cpu.get(name, 0.0)
        rows.append({"part": name, "wall_ms_per_step": 1e3 * w / steps, "cpu_ms_per_step": 1e3 * c / steps,
                     "wait_ms_per_step": 1e3 * (w - c) / steps, "share_of_step_wall": w / max(total_w, 1e-9)})
    print(f"{prof.steps} steps, {prof.rows / steps:.1f} rows per step, {tokens} tokens out, wall {wall:.2f} s, "
          f"engine thread inside Engine.step {total_w:.2f} s ({total_w / wall:.0%} of the run)")
    print(f"{'part':12s} {'wall ms/step':>12s} {'cpu ms/step':>12s} {'wait ms/step':>12s} {'share':>7s}")
    for r in rows:
        print(f"{r['part']:12s} {r['wall_ms_per_step']:12.3f} {r['cpu_ms_per_step']:12.3f} "
              f"{r['wait_ms_per_step']:12.3f} {r['share_of_step_wall']:7.1%}")
    print("CPU seconds by thread over the run:")
    for name in sorted(cpu1, key=lambda k: -(cpu1[k] - cpu0.get(k, 0.0))):
        d = cpu1[name] - cpu0.get(name, 0.0)
        if d >= 0.01:
            print(f"  {name:24s} {d:7.2f} s ({d / wall:.0%} of a core)")
            rows.append({"part": f"thread {name}", "wall_ms_per_step": 0.0, "cpu_ms_per_step": 1e3 * d / steps,
                         "wait_ms_per_step": 0.0, "share_of_step_wall": d / wall})
    return rows

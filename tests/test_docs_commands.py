"""Every command the docs tell a person to type works: each fenced ```bash block of README.md and docs/*.md runs
and exits 0, page by page, blocks in page order.

How, so that a failure is easy to read and the rules are plain:
- Where: a temporary copy of the repository (its tracked and new files, `git ls-files`), with `.venv` a link to
  the environment running the tests. The README's blocks run there first (a session fixture), as a person
  starts: its `make train` (with the caps below) prepares `data/` and writes the small `out/` checkpoint that the
  pages' commands read (sampling, evaluation, fine-tuning, quantization all start from it). Each docs page then
  runs in its own copy of that, so pages do not depend on one another (two pages at a time).
- How each block runs: a fresh `bash -e -o pipefail` at the copy's root, stdin closed, on CPU
  (CUDA_VISIBLE_DEVICES empty), offline (HF_HUB_OFFLINE and friends, wandb disabled), with the venv's `bin/`
  first on PATH, as after `source .venv/bin/activate`; PYTHONPATH is the copy, so the copy's code runs. One CPU
  thread per command (OMP_NUM_THREADS=1): the suite runs on shared 2-core machines, where torch's two threads per
  process fight the other processes (an `llm eval` measured 10x slower with two under load).
- Small sizes, said openly: `llm train` runs with `--max-steps` capped at MAX_STEPS and `--eval-iters` at
  EVAL_ITERS (a command asking for fewer keeps its own; the cap is printed in the block's output), and
  `make train` runs as `make train ARGS="..."` with the same caps (`-o .venv/.installed`: the set-up is the test
  run's own). Nothing else is changed: every other flag and command runs as written. `torchrun ... -m llm train`
  is not capped (torchrun starts its own processes): such blocks must give small sizes themselves.
- ```console blocks (GPU, network, several machines, stdin, hours) and ```text blocks (pasted output) are not
  run. A failure names the page, the block's first line number, the block and the last lines of its output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_STEPS = 8     # optimizer steps of any documented `llm train` / `make train` run
EVAL_ITERS = 2    # validation batches per estimate in those runs
BLOCK_TIMEOUT = 300
PAGES_AT_ONCE = 2  # docs pages run side by side (one CPU thread per command; CI machines have 2 cores)
FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

# `llm` inside the blocks: the real command, with the caps above applied to `llm train` (a bash function, so it
# also wins over a `source .venv/bin/activate` inside a block).
SHIM = '''\
import sys

from llm.cli import main

CAPS = {{"--max-steps": {steps}, "--eval-iters": {iters}}}
argv = sys.argv[1:]
if argv[:1] == ["train"]:
    for flag, cap in CAPS.items():
        vals = [int(argv[i + 1]) for i, a in enumerate(argv) if a == flag and i + 1 < len(argv)]
        if not vals or vals[-1] > cap:
            print(f"[docs test] llm train {{flag}} {{vals[-1] if vals else 'default'}} -> {{cap}}", file=sys.stderr)
            argv += [flag, str(cap)]
sys.exit(main(argv))
'''
PRELUDE = '''\
llm() {{ "{python}" "{shim}" "$@"; }}
make() {{
  if [ "${{1:-}}" = train ]; then command make -o .venv/.installed train ARGS="--max-steps {steps} --eval-iters {iters}"
  else command make -o .venv/.installed "$@"; fi
}}
'''


def blocks(page: Path) -> list[tuple[int, str]]:
    """(line number of the fence, script) of every ```bash block of a page, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def copy_repo(src: Path, dst: Path) -> None:
    """The repository's files (tracked and new, not ignored) under dst, and .venv -> this environment."""
    if (src / ".git").exists():
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                               capture_output=True, text=True, check=True).stdout.split("\0")
        for name in filter(None, names):
            if (src / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / name, dst / name)
    else:  # a copy made by an earlier step (the base): everything in it
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    if not (dst / ".venv").exists():
        (dst / ".venv").symlink_to(sys.prefix, target_is_directory=True)


def shell_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root),
               VIRTUAL_ENV=sys.prefix, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", CI="true", OMP_NUM_THREADS="1")
    return env


class Ran(NamedTuple):
    """What one block did: exit code (-9: killed at BLOCK_TIMEOUT), stdout + stderr, wall and CPU seconds."""

    returncode: int
    output: str
    wall: float
    cpu: float


def run_block(root: Path, script: str) -> Ran:
    shim = root / ".docs-test-llm.py"
    if not shim.exists():
        shim.write_text(SHIM.format(steps=MAX_STEPS, iters=EVAL_ITERS))
    prelude = PRELUDE.format(python=sys.executable, shim=shim, steps=MAX_STEPS, iters=EVAL_ITERS)
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", prelude + script], cwd=root, env=shell_env(root),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(BLOCK_TIMEOUT, os.killpg, (p.pid, signal.SIGKILL))
        timer.start()
        try:  # wait4: the block's own CPU time (it and every process it waited for), also when pages run at once
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return Ran(p.returncode, out.read(), time.perf_counter() - t0, usage.ru_utime + usage.ru_stime)


def failure(page: str, line: int, script: str, r: Ran) -> str:
    what = f"was killed after {BLOCK_TIMEOUT} s" if r.returncode == -signal.SIGKILL else f"exited {r.returncode}"
    return (f"{page}:{line}: this ```bash block {what}\n{textwrap.indent(script.rstrip(), '    ')}\n"
            f"--- its output (last 4000 characters):\n{r.output[-4000:]}")


def run_page(page: Path, root: Path) -> tuple[str | None, list[str]]:
    """Run the page's blocks in order at `root`: (the first failure's report or None, one line per block with its
    wall and CPU seconds, which the test prints: `pytest -rP` shows what each block costs the suite)."""
    name, costs = str(page.relative_to(ROOT)), []
    for line, script in blocks(page):
        r = run_block(root, script)
        costs.append(f"{name}:{line}: {r.wall:.1f} s wall, {r.cpu:.1f} s CPU, exit {r.returncode}")
        if r.returncode != 0:
            return failure(name, line, script, r), costs
    return None, costs


README = ROOT / "README.md"
RUN = [p for p in PAGES if blocks(p)]  # pages without a ```bash block have nothing to run


@pytest.fixture(scope="session")
def ran(tmp_path_factory, request) -> dict[Path, tuple[str | None, list[str]]]:
    """Every page's result. The README's blocks run first in a copy of the repository, as a person starts: its
    `make train` writes the `out/` (and prepares the `data/`) that the docs pages' commands read. Then each docs
    page runs in its own copy of that, PAGES_AT_ONCE pages at a time (they share nothing). Only the pages this
    pytest run selected (`-k inference` runs the README and docs/inference.md)."""
    top = tmp_path_factory.mktemp("docs")
    base = top / "README"
    base.mkdir()
    copy_repo(ROOT, base)
    results = {README: run_page(README, base)}
    if results[README][0] is None and not (base / "out" / "latest").is_file():
        results[README] = ("the README's blocks ran but left no out/ (make train's), which the docs pages read",
                           results[README][1])
    if results[README][0] is not None:
        return results

    def one(page: Path) -> tuple[str | None, list[str]]:
        root = top / page.stem
        copy_repo(base, root)
        return run_page(page, root)

    selected = {item.callspec.params.get("page") for item in request.session.items if hasattr(item, "callspec")}
    pages = [p for p in RUN if p != README and p in selected]
    with ThreadPoolExecutor(PAGES_AT_ONCE) as pool:
        results.update(zip(pages, pool.map(one, pages)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN, ids=[str(p.relative_to(ROOT)) for p in RUN])
def test_every_bash_block_of_the_page_runs(page, ran):
    if page not in ran:
        pytest.fail(f"not run: the README's blocks failed first (see the README.md case): {ran[README][0]}")
    report, costs = ran[page]
    print("\n".join(costs))
    assert report is None, report


def test_blocks_are_found_in_order_and_other_fences_are_not(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# t\n```bash\necho one\n```\n```console\nrm -rf /\n```\n```text\n$ x\n```\n"
                    "```bash\necho two \\\n  three\n```\n")
    assert blocks(page) == [(2, "echo one\n"), (11, "echo two \\\n  three\n")]
    assert README in RUN


def test_a_failing_block_is_reported_with_its_page_line_and_output(tmp_path):
    r = run_block(tmp_path, "echo fine\nfalse\necho never")
    assert r.returncode == 1 and r.output == "fine\n"
    msg = failure("docs/x.md", 7, "echo fine\nfalse\necho never", r)
    assert msg.startswith("docs/x.md:7: this ```bash block exited 1\n    echo fine\n    false")
    assert msg.endswith("--- its output (last 4000 characters):\nfine\n")


def test_a_block_that_hangs_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "BLOCK_TIMEOUT", 1)
    r = run_block(tmp_path, "echo started\nsleep 30")
    assert r.returncode == -signal.SIGKILL and r.output == "started\n" and r.wall < 20
    assert "was killed after 1 s" in failure("README.md", 3, "sleep 30", r)

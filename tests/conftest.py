"""Shared test setup: the interpreter switch, the tolerance table, comparison helpers, and the
tiny models, training corpus and one-thread switch the model / trainer tests share.

Without CUDA, Triton kernels run through TRITON_INTERPRET=1 on CPU tensors. The
variable must be set before any @triton.jit function is created, so it is set
here, before tests import kernel modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Imported only now: kernel modules must see TRITON_INTERPRET when their @triton.jit functions are made.
from llm.config import ModelConfig  # noqa: E402
from llm.generate import TextStream  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

# Device kernel tests run on: CUDA when present, else CPU through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Absolute / relative tolerances for a kernel output vs the fp32 reference, per input dtype.
# Used where the FlashAttention rule (below) does not apply (e.g. exact elementwise ops).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# Floor for the FlashAttention rule, so an exact low-precision reference (error 0) does not
# demand an exact kernel: error <= FA_FACTOR * ref_error + FA_FLOOR[dtype].
FA_FACTOR = 2.0
FA_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# The input dtypes of an elementwise kernel test, with ids.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Seed torch's global RNG per test from its id: inputs stay random but do not depend on which
    tests ran before (a run of one file, -k, or a different order gives the same numbers)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_fa_rule(out: torch.Tensor, ref_lp: torch.Tensor, ref_hp: torch.Tensor, name: str = "out") -> None:
    """FlashAttention rule: max|out - ref_hp| <= 2 * max|ref_lp - ref_hp| + floor.

    out: kernel result in low precision; ref_lp: reference op run in the same low
    precision; ref_hp: reference in fp32/fp64.
    """
    err = (out.double() - ref_hp.double()).abs().max().item()
    ref_err = (ref_lp.double() - ref_hp.double()).abs().max().item()
    bound = FA_FACTOR * ref_err + FA_FLOOR[out.dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, name: str = "out") -> None:
    tol = TOL[dtype or out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), msg=lambda m: f"{name}: {m}", **tol)


# ----------------------------------------------------------------------------- model and trainer tests

# A two-layer GQA model small enough for hundreds of forward passes on one CPU thread.
TINY = dict(vocab_size=101, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, kernels="torch")


def tiny_config(**kw) -> ModelConfig:
    """TINY with `kw` overriding or adding fields."""
    return ModelConfig(**(TINY | kw))


def tiny_model(**kw) -> Transformer:
    """A Transformer(tiny_config(**kw)) with weights drawn after torch.manual_seed(0), in train mode."""
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw))


def cached_and_uncached(model: Transformer, prompt: torch.Tensor, steps: int):
    """Greedy-decode `steps` tokens after `prompt` (B, T0) through a KV cache.

    Returns (seq (B, T0 + steps), the cached logits of every position (B, T0 + steps, V), the logits
    of one uncached pass over seq (B, T0 + steps, V)).
    """
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    with torch.no_grad():
        logits, _ = model(prompt, cache=cache)
        seq, cached = prompt, [logits]
        for _ in range(steps):
            nxt = cached[-1][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            cached.append(model(nxt, cache=cache)[0])
        full, _ = model(seq)
    return seq, torch.cat(cached, 1), full


def streamed_text(tok: Tokenizer, ids: list[int]) -> str:
    """The text of `ids` fed to a TextStream one token's bytes at a time, as generation streams it."""
    stream = TextStream()
    return "".join(stream.push(tok.decode_bytes([i])) for i in ids) + stream.close()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are far faster without OpenMP spinning.

    Opt in per module: `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_code_corpus(folder: Path) -> Path:
    """folder/corpus.txt: 400 small Python functions, enough text for a 300-token BPE and a few steps."""
    path = folder / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400)))
    return path


@pytest.fixture(scope="module")
def corpus_tmp(tmp_path_factory, request) -> Path:
    """A module's work folder holding the code corpus (write_code_corpus): what train_argv runs on."""
    tmp = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2].removeprefix("test_"))
    write_code_corpus(tmp)
    return tmp


def plant_losses(monkeypatch, bad: dict[int, float], batches: list | None = None) -> None:
    """Training forward number n in `bad` has its loss multiplied by bad[n] (nan: a NaN loss); `batches` collects
    the train micro-batch indices read."""
    from llm.data.shards import Loader

    real, calls = Transformer.forward, {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            loss = loss * bad.get(calls["n"], 1.0)
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", forward)
    if batches is not None:
        real_batch = Loader.batch

        def batch(self, i, device="cpu"):
            if self.split == "train":
                batches.append(i)
            return real_batch(self, i, device)

        monkeypatch.setattr(Loader, "batch", batch)


def metrics_records(out: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    """{step: train loss} of a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in metrics_records(out) if "loss" in r}


def train_argv(tmp: Path, out: str, **kw) -> list[str]:
    """train.py flags for a one-layer CPU run of 6 steps on tmp/corpus.txt into tmp/out; kw overrides or adds."""
    base = dict(dataset=tmp / "corpus.txt", data_dir=tmp / "data", out_dir=tmp / out, vocab_size=300, n_layer=1,
                n_embd=32, n_head=2, block_size=32, batch_size=4, max_steps=6, warmup_steps=2, eval_interval=100,
                eval_iters=2, save_interval=100, log_interval=1, kernels="torch", device="cpu")
    base.update(kw)
    return [a for k, v in base.items() for a in (f"--{k.replace('_', '-')}", str(v))]


TWO_RANK_JOB = """
import json, sys
from llm.train import distributed as dd
from llm.train.cli import resolve_configs
from llm.train.trainer import train

for argv, stop_at in json.loads(sys.argv[1]):
    mcfg, dcfg, tcfg, args = resolve_configs(argv)
    train(mcfg, dcfg, tcfg, args.resume, args.explicit, callbacks=[lambda step, rec: step == stop_at])
dd.cleanup()
"""


def run_two_ranks(tmp: Path, jobs: list[tuple[list, int]], nproc: int = 2) -> subprocess.CompletedProcess:
    """One torchrun launch of 2 (or nproc) gloo ranks (1 thread each) that trains each (train.py argv, stop_at step)
    job in turn (stop_at -1: to the end); asserts it exited 0 and returns it (stdout: what rank 0 printed)."""
    script = tmp / "two_rank_job.py"
    script.write_text(TWO_RANK_JOB)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        str(script), json.dumps([[list(map(str, a)), s] for a, s in jobs])], cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def skip_fp32_kernel_on_cuda(dtype: torch.dtype) -> None:
    """fp32 attention/decode kernels run only under the interpreter (their GPU tiles spill; llm.ops uses
    the reference for fp32 CUDA tensors), so on a GPU only their fp16/bf16 cases apply."""
    if HAS_CUDA and dtype == torch.float32:
        pytest.skip("fp32 attention/decode kernels run only under TRITON_INTERPRET (GPU: the reference)")


# ----------------------------------------------------------------------------- serving tests' shared pieces

SERVE_TEXT = "def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\nclass Point:\n    x: int = 0\n" * 30


def serve_checkpoint(folder: Path, seed: int, **cfg) -> Path:
    """A random model on a 300-token BPE of SERVE_TEXT (ids of multi-byte characters included), saved as a
    checkpoint in folder; cfg: ModelConfig fields beside the vocabulary (n_layer, n_embd, ...)."""
    from llm import checkpoint as ck

    tok = Tokenizer.train([SERVE_TEXT], 300)
    torch.manual_seed(seed)
    return ck.save(folder, "ckpt", Transformer(ModelConfig(vocab_size=tok.n_vocab, **cfg)), tok)


def post_all(url: str, bodies: list[dict], route: str = "/v1/completions", timeout: float = 120) -> list[dict]:
    """POST every body to url + route at once (concurrent requests) -> the JSON answers, in order."""
    import asyncio

    import httpx

    async def go():
        async with httpx.AsyncClient(timeout=timeout) as c:
            return await asyncio.gather(*(c.post(url + route, json=b) for b in bodies))

    return [r.json() for r in asyncio.run(go())]


GGUF_CORPUS = ["def f(x):\n    return x + 1\n" * 20,
               "héllo wörld, 123 4567 日本語 🙂\n\n\n  tabs\tand 'quotes' it's\r\n"]


@pytest.fixture(scope="module")
def gguf_model_and_tok() -> tuple[Transformer, Tokenizer]:
    """A random 2-layer GQA model (untied head) and a 320-token BPE trained on GGUF_CORPUS: the GGUF / llama.cpp
    tests' model (byte-level edge cases in the corpus: accents, CJK, emoji, tabs, CRLF, quotes)."""
    tok = Tokenizer.train(GGUF_CORPUS, 320)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, tie_embeddings=False)
    return Transformer(cfg).eval(), tok


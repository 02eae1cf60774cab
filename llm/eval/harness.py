"""An lm-evaluation-harness backend on our KV cache: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

Requests are encoded exactly as lm-eval's own causal backends encode them (TemplateLM: the context's
trailing spaces move to the continuation, the pair is encoded whole and split; an empty context is
the prefix token), and scored as its `hf` backend scores them: the input is (context + continuation)
cut to its last max_length + 1 tokens, minus the last; the last len(continuation) logits score it.

Shared contexts are encoded once: each input is split into a prefix (all but the last
len(continuation) - 1 tokens) and a tail. Requests are sorted by prefix and cut into batches; a
batch prefills each distinct prefix once into a KV cache (ragged rows), copies each prefix's cache
rows to the requests that share it, and runs all tails in one more forward pass. A multiple-choice
question's choices so cost one context pass, not one each.

lm-eval is an optional dependency (`pip install -e .[eval]`); importing this module without it
raises an EvalError with that line. lm-eval has no plugin entry points, so `lm_eval --model llm`
works only in a process that imported this module: `python -m llm.eval.harness ...` is lm-eval's
own command line with the `llm` backend registered, and `python -m llm.eval --tasks ...` runs tasks
through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from llm.config import run_main
from llm.eval.perplexity import EvalError
from llm.generate.api import complete
from llm.generate.decode import prefill
from llm.generate.sampling import SamplingParams
from llm.loading import load_model
from llm.model import Transformer
from llm.runtime import pick_device, pick_dtype
from llm.tokenizer import Tokenizer

try:
    import lm_eval.models  # noqa: F401  (the built-in backends: registering ours first would hide them)
    import yaml
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
except ImportError:  # pragma: no cover - exercised only without the extra
    raise EvalError("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)") from None

DEFAULT_MAX_GEN_TOKS = 256


@register_model("llm")
class LLMEvalLM(TemplateLM):
    """lm-eval model `llm`: `--model llm --model_args checkpoint=DIR[,device=cpu,dtype=float32,kernels=torch]`.

    checkpoint: ours, a training out-dir or a Hugging Face directory (anything `load_model` takes).
    batch_size: requests per forward pass; max_length: tokens of context (default the model's).
    """

    def __init__(self, checkpoint: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int | str = 16, max_length: int | None = None, kernels: str | None = None,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None, **_ignored) -> None:
        """From a checkpoint path, or from a model and tokenizer already in memory (evaluation during training)."""
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise EvalError("the llm backend needs checkpoint=DIR (a checkpoint, out-dir or HF directory)")
            dev = pick_device(str(device))
            model, tokenizer, _ = load_model(checkpoint, dev, pick_dtype(str(dtype), dev),
                                             **({"kernels": kernels} if kernels else {}))
        self.model, self.tok = model, tokenizer
        dev = model.lm_head.weight.device
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {batch_size}")
        self._max_length = int(max_length) if max_length else self.model.n_positions
        if not 2 <= self._max_length <= self.model.n_positions:
            raise EvalError(f"max_length must be in [2, {self.model.n_positions}] (the context), got {max_length}")
        self._device = dev

    # ------------------------------------------------------------------ what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Plain-text ids (special-token strings are text); a BOS first when the tokenizer adds one,
        unless asked not to or the string already starts with it (lm-eval's rule)."""
        bos = self.tok.add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self.tok.decode([self.tok.bos_id])):
            bos = False
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(sum log p(continuation | context), continuation is the greedy choice)] per (key, ctx ids, cont ids)."""
        split = [self._split(ctx, cont) for _, ctx, cont in requests]
        order = sorted(range(len(split)), key=lambda i: (split[i][0], len(split[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(split)
        for idx in self._batches(order, split):
            for i, res in zip(idx, self._score_batch([split[i] for i in idx])):
                out[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return out  # type: ignore[return-value]

    def _batches(self, order: list[int], split: list) -> Iterator[list[int]]:
        """Runs of at most batch_size requests whose longest prefix + longest tail fit the context (a padded
        tail sits after every row's prefix, so its positions must exist)."""
        batch: list[int] = []
        longest_p = longest_t = 0
        for i in order:
            p, t = len(split[i][0]), len(split[i][1])
            if batch and (len(batch) == self.batch_size or
                          max(longest_p, p) + max(longest_t, t) > self.model.n_positions):
                yield batch
                batch, longest_p, longest_t = [], 0, 0
            batch.append(i)
            longest_p, longest_t = max(longest_p, p), max(longest_t, t)
        if batch:
            yield batch

    def _split(self, ctx: list[int], cont: list[int]) -> tuple[tuple[int, ...], list[int], list[int]]:
        """(prefix, tail, targets): the scored input is prefix + tail; its last len(cont) logits score cont."""
        n = len(cont)
        inp = (ctx + cont)[-(self.max_length + 1):][:-1]
        if n == 0 or n > len(inp):
            raise EvalError(f"cannot score a continuation of {n} tokens within max_length {self.max_length}")
        cut = len(inp) - n + 1
        return tuple(inp[:cut]), inp[cut:], cont

    @torch.no_grad()
    def _score_batch(self, items: list[tuple[tuple[int, ...], list[int], list[int]]]) -> Iterator[tuple[float, bool]]:
        prefixes = sorted(set(p for p, _, _ in items))
        where = {p: i for i, p in enumerate(prefixes)}
        m = self.model
        cache = m.new_cache(len(prefixes), max(map(len, prefixes)) + max(len(t) for _, t, _ in items))
        first = prefill(m, cache, [list(p) for p in prefixes])  # (P, V) logits at each prefix's last token
        rows = torch.tensor([where[p] for p, _, _ in items], device=first.device)
        first = first[rows]
        tails = None
        width = max(len(t) for _, t, _ in items)
        if width:
            cache.reorder(rows)  # each request continues its prefix's cache
            ids = torch.zeros(len(items), width, dtype=torch.long)
            for r, (_, t, _) in enumerate(items):
                ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            tails, _ = m(ids.to(first.device), cache=cache)  # (N, width, V); padding after a row's tail is unread
        for r, (_, t, cont) in enumerate(items):
            logits = first[r:r + 1] if tails is None else torch.cat([first[r:r + 1], tails[r, :len(t)]])
            logp = logits.float().log_softmax(-1)  # (n, V)
            target = torch.tensor(cont, device=logp.device)
            yield float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum log p of a whole text in disjoint windows of max_length tokens (lm-eval's windows, context 1)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first `until` string; batched by settings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._gen_settings(r.args[1]), []).append(i)
        for (until, max_toks, temperature, top_p), idx in groups.items():
            room = self.max_length - max_toks
            if room < 1:
                raise EvalError(f"max_gen_toks {max_toks} leaves no room for a context in max_length {self.max_length}")
            params = SamplingParams(temperature, top_p=top_p)
            for lo in range(0, len(idx), self.batch_size):
                chunk = idx[lo:lo + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in chunk]
                for i, c in zip(chunk, complete(self.model, self.tok, prompts, max_toks, params=params,
                                                stop=list(until), seed=0)):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out  # type: ignore[return-value]

    def _gen_settings(self, kw: dict) -> tuple[tuple[str, ...], int, float, float | None]:
        """(until, max_gen_toks, temperature, top_p) from a request's gen_kwargs (greedy unless do_sample)."""
        kw = dict(kw or {})
        until = kw.pop("until", None) or [self.tok.decode([self.eot_token_id])]
        until = (until,) if isinstance(until, str) else tuple(until)
        max_toks = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sample = bool(kw.pop("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
        temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
        top_p = kw.get("top_p") if sample else None
        return until, max_toks, temperature, None if top_p is None else float(top_p)


def resolve_tasks(tasks: list[str], include_path: str | None = None) -> tuple[list[str], TaskManager, Path | None]:
    """(task names, their TaskManager, folder to run in): a task given as a YAML path is loaded from its folder
    (its data_files are relative to it); every name is checked before any model work. lm-eval's built-in
    tasks (thousands of YAMLs: slow to index) are indexed only when a name is not found among the given ones."""
    names, paths, cwd = [], [include_path] if include_path else [], None
    for t in tasks:
        p = Path(t)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise EvalError(f"task file not found: {t}")
            spec = yaml.safe_load(p.read_text()) or {}
            if not isinstance(spec, dict) or "task" not in spec:
                raise EvalError(f"{t}: not an lm-eval task YAML (no 'task' key)")
            names.append(str(spec["task"]))
            if str(p.resolve().parent) not in paths:
                paths.append(str(p.resolve().parent))
            cwd = cwd or p.resolve().parent
        else:
            names.append(t)
    if not names:
        raise EvalError("no task given")
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(unknown)} (give a name lm-eval knows, or the path "
                        "of a task YAML)")
    return names, manager, cwd


def run_tasks(lm: LLMEvalLM, tasks: list[str], limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: str | None = None, seed_rngs: bool = True) -> dict:
    """lm-eval's simple_evaluate of `tasks` with our backend -> its results dict ("results", "samples", ...).

    seed_rngs=False leaves Python's, numpy's and torch's global RNGs unseeded (a training run's streams)."""
    names, manager, cwd = resolve_tasks(tasks, include_path)
    seeds = {} if seed_rngs else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    here = Path.cwd()
    os.chdir(cwd or here)
    try:
        return simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, log_samples=True,
                               task_manager=manager, **seeds)
    finally:
        os.chdir(here)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line with the `llm` backend registered: `--model llm --model_args checkpoint=DIR`."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    run_main(main)

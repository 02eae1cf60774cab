"""Reward functions for online RL (--objective grpo --reward module:function).

A reward function is `fn(prompt: str, completion: str, reference: str) -> float`: the prompt as the model saw
it (chat template rendered), the sampled answer (decoded, without the end-of-turn token), and the dataset's
reference answer. `--reward exact_match` names the built-in ones here; `--reward my_pkg.rewards:score` imports
the user's module (any importable module: the current directory is on the path when run from it).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from llm.config import ConfigError

RewardFn = Callable[[str, str, str], float]


def exact_match(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the answer equals the reference (surrounding whitespace ignored), else 0.0."""
    return float(completion.strip() == reference.strip())


def prefix_match(prompt: str, completion: str, reference: str) -> float:
    """The fraction of the reference's characters the answer gets right from its start (a denser signal than
    exact_match for a model that is still far off): len(common prefix) / max(len(answer), len(reference))."""
    a, b = completion.strip(), reference.strip()
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "prefix_match": prefix_match}


def load(spec: str) -> RewardFn:
    """A built-in name, or 'module:function'; one ConfigError when it cannot be found or called."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--reward {spec!r}: give a built-in ({', '.join(BUILTIN)}) or module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: a module in the current directory is importable
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"--reward {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"--reward {spec!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: {name!r} is not callable")
    return fn

"""Every command the code base suggests (in error messages, hints, help and docstrings of llm/, train.py and
sample.py) works as printed: its --help runs, exits 0, prints its usage, and knows every flag the suggestion
uses. A command that is gone, or a module run as a script that does nothing, fails here (issue 26)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "llm").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
SUBCOMMANDS = {"llm.interop": ("export", "merge", "import-peft"), "llm.checkpoint": ("consolidate",)}
CMD = re.compile(r"(?:python -m ((?:llm|kernels|benchmarks)[\w.]*)|\bllm (" + "|".join(COMMANDS) +
                 r")\b|(?:python )?\b(sample|train)\.py)((?:[ \t]+(?:--?[a-z][\w-]*|[^\s`'\"(),;|-][^\s`'\"(),;|]*))*)")


def _strings(path: Path) -> list[str]:
    """The text of every string literal in a file (f-strings with their fields as X)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values))
    return out


def suggested() -> dict[tuple[str, ...], set[str]]:
    """{the argv that names a command (without --help): the flags suggestions give it}."""
    found: dict[tuple[str, ...], set[str]] = {}
    for path in SOURCES:
        for text in _strings(path):
            for m in CMD.finditer(text):
                module, llm_cmd, script, rest = m.groups()
                words = rest.split()
                if module:
                    argv = ("-m", module)
                    if words and words[0] in SUBCOMMANDS.get(module, ()):
                        argv += (words[0],)
                elif llm_cmd:
                    argv = ("-m", "llm", llm_cmd)
                else:
                    argv = (f"{script}.py",)
                found.setdefault(argv, set()).update(w for w in words if re.fullmatch(r"--[a-z][\w-]*", w))
    return found


COMMANDS_FOUND = suggested()


def test_the_scan_finds_the_known_suggestions():
    """The scan is not empty-handed: the trainer's hint and the interop commands are among what it finds."""
    assert ("-m", "llm", "sample") in COMMANDS_FOUND and "--checkpoint" in COMMANDS_FOUND["-m", "llm", "sample"]
    assert ("-m", "llm", "import-peft") in COMMANDS_FOUND and ("-m", "llm.interop", "merge") in COMMANDS_FOUND


def _main_of(argv: tuple[str, ...]):
    """The `main(argv)` that `python ARGV` runs, and the arguments before the user's: a module run with -m
    runs its own main (a package: its __main__'s); a script file its main."""
    if argv[0] != "-m":
        spec = importlib.util.spec_from_file_location(argv[0][:-3], ROOT / argv[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main, list(argv[1:])
    mod = importlib.import_module(argv[1])
    if hasattr(mod, "__path__"):  # a package: python -m runs its __main__
        mod = importlib.import_module(argv[1] + ".__main__")
    src = Path(mod.__file__).read_text()
    assert 'if __name__ == "__main__"' in src, f"python -m {argv[1]} runs nothing (no __main__ block)"
    return mod.main, list(argv[2:])


@pytest.mark.parametrize("argv", sorted(COMMANDS_FOUND), ids=" ".join)
def test_every_suggested_command_runs_as_printed(argv, capsys):
    """In-process (a subprocess per command costs a torch import each): the module's main with --help."""
    main, args = _main_of(argv)
    with pytest.raises(SystemExit) as e:
        rc = main([*args, "--help"])
        raise SystemExit(rc)
    out = capsys.readouterr().out
    assert e.value.code in (0, None), f"{' '.join(argv)} --help exited {e.value.code}"
    assert "usage" in out.lower(), f"{' '.join(argv)} --help printed no usage (does the module do nothing?)"
    unknown = sorted(f for f in COMMANDS_FOUND[argv] if f not in out and f != "--help")
    assert not unknown, f"suggestions give {' '.join(argv)} flags its --help does not list: {unknown}"


@pytest.mark.parametrize("module", ["llm.interop.hf_export", "llm.interop.adapters"])
def test_library_modules_run_as_scripts_say_where_to_go(module):
    """The former export entry points exit non-zero naming the one that replaced them, never 0 silently."""
    r = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "python -m llm.interop" in r.stderr, (r.returncode, r.stderr)

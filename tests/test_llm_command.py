"""The `llm` console command (llm/cli.py): every subcommand is exactly the module it wraps, `llm --help`
lists them without importing torch, and an unknown subcommand is one error line."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.cli import COMMANDS
from llm.cli import main as cli_main

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_package_installs_the_llm_console_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llm"] == "llm.cli:main"


def test_llm_help_lists_every_subcommand_without_importing_torch():
    code = "import sys; from llm.cli import main; rc = main(['--help']); print('torch' in sys.modules, rc)"
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False 0"), "llm --help imported torch (slow start) or failed"
    for name in ("train", "sample", "chat", "serve", "eval", "quantize", "export", "data"):
        assert f"\n  {name} " in r.stdout, f"{name} missing from llm --help"


# Each subcommand and the spelling it stands for: the module whose main runs it, and the leading arguments.
SAME_AS = {"train": ("llm.train.cli", []), "sample": ("llm.generate.cli", []),
           "chat": ("llm.generate.cli", ["--chat"]), "eval": ("llm.eval.__main__", []),
           "quantize": ("llm.quantize.__main__", []), "prune": ("llm.prune.__main__", []),
           "export": ("llm.interop.__main__", ["export"]), "merge": ("llm.interop.__main__", ["merge"]),
           "import-peft": ("llm.interop.__main__", ["import-peft"]),
           "serve": ("llm.serve.__main__", []), "data": ("llm.data.__main__", []),
           "checkpoint": ("llm.checkpoint", []), "plan": ("llm.train.plan", []), "score": ("llm.train.score", []),
           "export-gguf": ("llm.interop.export_gguf", [])}


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_says_what_it_stands_for():
    assert set(SAME_AS) == set(COMMANDS)
    # train.py and sample.py (kept: the design card names them) run the same main as llm train / sample
    for script, module in (("train.py", "llm.train.cli"), ("sample.py", "llm.generate.cli")):
        assert f"from {module} import main" in (ROOT / script).read_text()


@pytest.mark.parametrize("name", sorted(SAME_AS))
def test_each_subcommand_help_is_its_modules_help(name, capsys):
    module, prefix = SAME_AS[name]
    via_llm = help_text(cli_main, [name, "--help"], capsys)
    direct = help_text(importlib.import_module(module).main, [*prefix, "--help"], capsys)
    assert via_llm == direct
    assert via_llm.startswith(f"usage: llm {'sample' if name == 'chat' else name} ")


def test_unknown_subcommand_is_one_error_line():
    r = run("-m", "llm", "trian", "--max-steps", "1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown command 'trian'"), r.stderr


def test_no_subcommand_prints_usage_and_fails():
    r = run("-m", "llm")
    assert r.returncode == 2 and r.stderr.startswith("usage: llm COMMAND")


@pytest.mark.parametrize("args", [("-m", "llm", "--help"), ("-m", "llm", "data", "--help")],
                         ids=["llm", "llm-data"])
def test_output_into_a_pipe_whose_reader_stopped_ends_quietly(args):
    """`llm data --help | head -3`: the reader goes away before the command writes; no BrokenPipeError traceback,
    status 141 (128 + SIGPIPE) as a shell reports for Unix tools. The run_main path of `python -m` entries
    is the same guard (the next test checks every entry uses it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's default: stdout buffered
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_every_command_line_entry_exits_through_the_pipe_guard():
    """Every `if __name__ == "__main__":` block that runs a main (llm/, train.py, sample.py) is run_main(main)
    (llm.config.guard_pipe), and the `llm` command's main goes through guard_pipe too."""
    files = [*sorted((ROOT / "llm").rglob("*.py")), ROOT / "train.py", ROOT / "sample.py"]
    guarded = {"llm/cli.py", "llm/__main__.py"}  # the `llm` command: its main is guard_pipe(_dispatch, ...)
    bare = [str(f.relative_to(ROOT)) for f in files if "sys.exit(main())" in f.read_text()
            and str(f.relative_to(ROOT)) not in guarded]
    assert not bare, f"entries that print a traceback on a closed pipe (use run_main(main)): {bare}"
    assert "guard_pipe(_dispatch" in (ROOT / "llm" / "cli.py").read_text()


def test_a_broken_pipe_other_than_stdout_is_not_swallowed():
    from llm.config import guard_pipe

    def main(argv):
        raise BrokenPipeError("a socket, not stdout")

    with pytest.raises(BrokenPipeError):
        guard_pipe(main)

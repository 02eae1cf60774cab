"""The layout's rules, checked on the source: imports run one way (CLIs and benchmarks -> stages ->
model/ops -> kernels), no import cycles, `kernels/` never imports `llm/`, and no function-local import
inside `llm/` except the lazy kernel loads of the op switch (llm/ops.py) and optional extras (lm-eval)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llm.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llm", "kernels", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + [ROOT / "train.py", ROOT / "sample.py"]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[int] = set()
    stack = list(tree.body)
    while stack:  # module level, also inside top-level if / try blocks (version checks, optional deps)
        n = stack.pop()
        top.add(id(n))
        if isinstance(n, (ast.If, ast.Try)):
            stack += n.body + n.orelse + getattr(n, "finalbody", []) + [s for h in getattr(n, "handlers", [])
                                                                         for s in h.body]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    """module -> project modules it imports at module level (a package import also loads its __init__)."""
    known = {module_name(p) for p in project_files()}
    g: dict[str, set[str]] = {}
    for p in project_files():
        deps = set()
        for name, at_top in imports(p):
            if not at_top:
                continue
            while name and name not in known:  # `from llm.x import f` names llm.x.f
                name = name.rpartition(".")[0]
            if name:
                deps.add(name)
        g[module_name(p)] = deps - {module_name(p)}
    return g


def test_no_import_cycle_anywhere():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_kernels_never_import_llm():
    for p in sorted((ROOT / "kernels").rglob("*.py")):
        bad = [name for name, _ in imports(p) if name.split(".")[0] in ("llm", "benchmarks")]
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}: kernels/ must stand alone"


def test_library_imports_run_one_way():
    """The core (model, ops, config, ...) never imports a stage; stages never import the CLIs or benchmarks."""
    stages = ("llm.data", "llm.train", "llm.generate", "llm.eval", "llm.interop", "llm.serve", "llm.quantize",
              "llm.prune")
    for p in sorted((ROOT / "llm").rglob("*.py")):
        m = module_name(p)
        for name, _ in imports(p):
            assert name.split(".")[0] != "benchmarks", f"{m} imports {name}"
            if not m.startswith(stages) and m != "llm.loading":
                assert not name.startswith(stages), f"core module {m} imports the stage module {name}"
            if m != "llm.__main__":  # `python -m llm` is the `llm` command
                assert not name.startswith("llm.cli"), f"{m} imports the `llm` command (llm/cli.py), a CLI"


def test_the_llm_command_dispatches_to_project_command_lines_only():
    """llm/cli.py loads its subcommands' modules by name (so `llm --help` needs no torch): each is a module of
    llm/ with a main (a stage's command line), never the dispatcher itself."""
    for name, cmd in COMMANDS.items():
        assert cmd.module.startswith("llm.") and cmd.module not in ("llm.cli", "llm.__main__"), (name, cmd.module)
        assert (ROOT / (cmd.module.replace(".", "/") + ".py")).is_file(), f"llm {name}: no file for {cmd.module}"


# Function-local imports that load an optional extra only when asked for (not a dodged cycle).
OPTIONAL = {"llm/eval/__main__.py": {"llm.eval", "llm.eval.harness"},
            "llm/train/tasks.py": {"llm.eval", "llm.eval.harness"}}


def test_no_function_local_import_inside_the_library_but_the_lazy_kernel_loads():
    for p in sorted((ROOT / "llm").rglob("*.py")):
        allowed = OPTIONAL.get(str(p.relative_to(ROOT)), set())
        local = [name for name, at_top in imports(p) if not at_top and name not in allowed]
        if p.name == "ops.py" and p.parent.name == "llm":
            assert all(n.startswith("kernels.") for n in local), local
            continue
        assert not local, f"{p.relative_to(ROOT)} imports {local} inside a function (a hidden edge or a dodged cycle)"

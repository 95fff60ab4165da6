"""The house's shape: every module imports in a fresh interpreter, imports never go round in a
circle, and importing the runtime changes nothing process-wide (no global module hooks)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama", "ui")


def module_names() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__main__.py":
                continue  # running it is the command itself
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_file(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(name: str, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for t in targets:
            if t in known:
                found.add(t)
                break  # "from pkg.mod import x": the submodule when x is one, else pkg.mod
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n], _ = 1, stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n], _ = 2, stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_import_graph_has_no_circle() -> None:
    names = module_names()
    known = set(names)
    graph = {n: imports_of(n, known) for n in names}
    assert graph["llama.parallel.check"] >= {"llama.parallel.runtime"}  # the walk sees lazy ones
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_and_installs_no_global_hooks() -> None:
    code = f"""
import importlib, torch.nn.modules.module as m
def tables():
    items = vars(m).items()
    return {{k: len(v) for k, v in items if k.startswith("_global_") and isinstance(v, dict)}}
before = tables()
for name in {module_names()!r}:
    importlib.import_module(name)
after = tables()
changed = {{k: (before[k], after[k]) for k in after if after[k] != before.get(k)}}
assert len(before) >= 8, sorted(before)  # the hook tables are where we look for them
assert not changed, changed
print("ok", len(before))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")

"""The package's shape: every module imports on its own, and the internal imports form no cycle.

A cycle hidden behind an import inside a function still couples two modules (each needs the
other's names), so the static scan reads every import statement, wherever it is.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from builders import split_conv_concat

ROOT = Path(__file__).resolve().parents[1]
# Source folder of each package: gconv_compile.passes is built from the top-level passes/.
SOURCES = {"gconv_compile": ROOT / "gconv_compile", "gconv_compile.passes": ROOT / "passes"}


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's own name is its __init__)."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "gconv_compile" and parts[0] == "passes":
                continue  # not in the wheel: the passes come from passes/
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_scan_sees_imports_inside_functions_and_finds_a_planted_cycle():
    graph = import_graph()
    # build imports the schedules inside a function (to keep TVM off optimize's path).
    assert "gconv_compile.tvm_schedules" in graph["gconv_compile.build"]
    assert "gconv_compile.passes" in graph["gconv_compile.targets"]
    planted = {**graph, "gconv_compile.errors": {"gconv_compile.cli"}}
    assert find_cycle(planted) is not None


def test_the_package_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_compile_is_the_function_not_a_module():
    import gconv_compile

    assert "gconv_compile.compile" not in package_modules()
    assert callable(gconv_compile.compile) and not isinstance(gconv_compile.compile, type(ast))


def _import_alone(name: str) -> tuple[str, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    return name, done.returncode, done.stderr[-2000:]


@pytest.mark.parametrize("batch", [0, 1], ids=["first-half", "second-half"])
def test_every_module_imports_alone_in_a_fresh_interpreter(batch):
    names = sorted(package_modules())[batch::2]
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [r for r in pool.map(_import_alone, names) if r[1] != 0]
    assert not failures, failures


# ------------------------------------------------------------------------------ packaging


def test_the_wheel_of_a_clean_clone_installs_one_top_level_package(tmp_path):
    """Built from what is committed, as a user's pip would (no network: setuptools is here)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(clone)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("gconv_compile-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"gconv_compile", f"{wheel.name.split('-py')[0]}.dist-info"}, top
    assert "gconv_compile/passes/fold_split_conv_concat.py" in names
    assert "gconv_compile/profiles/llvm.json" in names


def test_the_cli_works_from_a_folder_holding_a_passes_module(tmp_path):
    """A user's own passes.py (or passes/ package) must not shadow the installed passes."""
    (tmp_path / "passes.py").write_text(
        "raise ImportError('the user\\'s passes.py was imported')\n"
    )
    onnx.save(split_conv_concat(seed=1), tmp_path / "m.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "gconv_compile", "optimize", "m.onnx", "-o", "out.onnx"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 blocks folded" in done.stdout
    groups = [a.i for n in onnx.load(tmp_path / "out.onnx").graph.node for a in n.attribute
              if a.name == "group"]  # fmt: skip
    assert groups == [2]


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted([*(ROOT / "gconv_compile").rglob("*.py"), *(ROOT / "passes").rglob("*.py")])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    """Issue #10's sizes: a module holds one job (<= 600 lines), a function one step (<= 80)."""
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path.name}: {source.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: {', '.join(long)}"

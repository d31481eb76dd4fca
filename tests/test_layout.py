"""The code's shape: the packages' layering, and module sizes with their reasons."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("strategies", "privacy", "task", "client", "server", "simulations", "bench")
#: a package may import only packages on its left (strategies is the bottom)
ORDER = ("strategies", "privacy", "task", "server", "client", "simulations", "bench")
MAX_LINES = 420


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_a_long_module_says_why_at_its_top():
    long = []
    for path in _modules():
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if "Why one module" not in doc.split("\n\n", 2)[1 if "\n\n" in doc else 0]:
                long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, f"split these modules or say why at the top of their docstring: {long}"


def test_imports_only_run_down_the_layers():
    upward = []
    for path in _modules():
        package = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                target = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                target = node.names[0].name.split(".")[0]
            else:
                continue
            if target in ORDER and ORDER.index(target) > ORDER.index(package):
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
            if {package, target} == {"server", "client"}:  # both sit on task, side by side
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward, upward

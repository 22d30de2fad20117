"""The package layers (pyproject.toml, [tool.importlinter]) hold: lint-imports passes, a planted back-edge fails
it, no module imports itself back through others, and no module is over 400 lines."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason='import-linter is not installed (pip install "fedsim[test]")')

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedsim"
MAX_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with `root` first on the path, so its fedsim (and pyproject.toml) are the ones read."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_a_back_edge_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "fedsim", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    low = tmp_path / "fedsim" / "spec" / "fields.py"
    low.write_text(low.read_text() + "\nimport fedsim.cli  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "fedsim.spec.fields -> fedsim.cli" in result.stdout


def _imports(path: Path, module: str) -> set[str]:
    """The fedsim modules `module` imports, at any depth of its code (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "fedsim" or m.startswith("fedsim.")}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {d for d in _imports(p, m) if d in mods and d != m and d != "fedsim"} for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_is_over_400_lines():
    modules = [*PACKAGE.rglob("*.py"), *(ROOT / "analysis").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in modules
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these along their concepts: {long}"


def test_policy_facing_types_have_no_any():
    """Everything a policy is handed or returns is typed: no `Any` in the protocols' fields and hooks."""
    import inspect
    import typing

    import torch

    from fedsim.learn.grads import GradientEngine
    from fedsim.learn.local import LocalTrainer
    from fedsim.learn.profile import ModelProfile
    from fedsim.policies import asynchronous, base, sync

    # the torch-side types the policy modules name under TYPE_CHECKING only (`fedsim policies` imports no torch)
    deferred = {"torch": torch, "GradientEngine": GradientEngine, "LocalTrainer": LocalTrainer,
                "ModelProfile": ModelProfile}
    checked = []
    for cls in (sync.RunContext, sync.RoundContext, sync.RoundInputs, sync.RoundUpdate, sync.SyncPolicy,
                asynchronous.AsyncPolicy, base.PolicyBase, base.PolicyState):
        hints = {f"{cls.__name__}.{k}": v for k, v in typing.get_type_hints(cls, localns=deferred).items()}
        for name, fn in inspect.getmembers(cls, callable):
            if not name.startswith("_") and getattr(fn, "__module__", "").startswith("fedsim.policies"):
                hints.update({f"{cls.__name__}.{name}.{k}": v
                              for k, v in typing.get_type_hints(fn, localns=deferred).items()})
        checked += hints
        assert not {k: v for k, v in hints.items() if "Any" in repr(v)}, cls.__name__
    assert len(checked) > 40 and "SyncPolicy.deadline.return" in checked and "RoundInputs.trainer" in checked


def test_the_install_lists_every_package_and_names_the_analysis_fedsim_analysis():
    """pyproject.toml lists the packages by hand (to install analysis/ as `fedsim_analysis`, which setuptools'
    find cannot do): every package under fedsim/ must be in that list, and no top-level `analysis`."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(config["packages"]) == found | {"fedsim_analysis"}
    assert config["package-dir"] == {"fedsim_analysis": "analysis"}
    assert "analysis" not in config["packages"]

"""The code rules `make test` runs before pytest: the import contracts (`lint-imports`) and
`ruff` fail on a planted violation and pass without it; importing Ava installs no global hooks.

Each check runs on a copy of the package and of pyproject.toml (which holds both configurations)
in a temporary folder, so the planted lines never touch the real tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {BIN}; install the dev extra: pip install -e '.[dev]'")
    return str(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of src/Ava and pyproject.toml."""
    shutil.copytree(ROOT / "src" / "Ava", tmp_path / "src" / "Ava", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / "src" / "Ava" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # planted\n", encoding="utf-8")


def _lint_imports(tree: Path, contract: str) -> subprocess.CompletedProcess:
    # The copy comes first on the path, so grimp reads it, not the installed package.
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run([_tool("lint-imports"), "--no-cache", "--contract", contract], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def _ruff(tree: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("ruff"), "check", "--no-cache", str(Path("src") / "Ava" / module)], cwd=tree,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("contract, module, line, reported", [
    # layers/ may import only torch and config/: a layer reaching up to training/
    ("layers", "layers/norm.py", "from ..training import metrics", "Ava.layers.norm -> Ava.training.metrics"),
    # the back-edge DESIGN forbids: models/ importing utils/ (checkpoint files live in config/)
    ("model-core", "models/moe_model.py", "from ..utils import checkpoint", "Ava.models.moe_model -> Ava.utils"),
    # data/ never imports the model side
    ("data-side", "data/packing.py", "from ..models import outputs", "Ava.data.packing -> Ava.models.outputs"),
    # generation and evaluation are independent (the CLI composes them)
    ("generation-evaluation", "evaluation/__init__.py", "from ..generation import sampling",
     "Ava.evaluation -> Ava.generation.sampling"),
    # a cycle inside a package: records is imported by readers
    ("no-cycles", "data/records.py", "from . import readers", "No cycles are allowed in Ava.data"),
])
def test_import_contracts_fail_on_a_planted_violation(tree, contract, module, line, reported):
    clean = _lint_imports(tree, contract)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _plant(tree, module, line)
    planted = _lint_imports(tree, contract)
    assert planted.returncode != 0
    assert reported in planted.stdout, planted.stdout


@pytest.mark.parametrize("line, rule", [
    ("import json", "F401"),  # unused import
    ("value = undefined_name + 1", "F821"),  # undefined name
])
def test_ruff_fails_on_a_planted_finding(tree, line, rule):
    module = "layers/mlp.py"
    clean = _ruff(tree, module)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _plant(tree, module, line)
    planted = _ruff(tree, module)
    assert planted.returncode != 0
    assert rule in planted.stdout, planted.stdout


def test_importing_every_module_installs_no_global_hook():
    """No module registers process-wide torch hooks at import time (DESIGN: no hidden global state)."""
    code = """
import importlib, pkgutil
import torch.nn.modules.module as module_hooks
import torch.optim.optimizer as optimizer_hooks
import Ava
for info in pkgutil.walk_packages(Ava.__path__, "Ava."):
    if info.name != "Ava.__main__":
        importlib.import_module(info.name)
registries = {name: getattr(m, name) for m in (module_hooks, optimizer_hooks) for name in dir(m)
              if name.startswith("_global") and name.endswith("hooks")}
assert len(registries) >= 8, sorted(registries)
print({name: len(hooks) for name, hooks in registries.items() if len(hooks)})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{}", f"global hooks registered at import: {done.stdout}"

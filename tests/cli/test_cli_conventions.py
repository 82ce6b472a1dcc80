"""CLI conventions: overrides anywhere after the config, ``--version``, signal exit codes, the
resume message for ``run.name``, and the README's command block against the parser."""

import argparse
import json
import logging
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import Ava
from Ava.cli import main as cli
from Ava.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------------------------
# overrides after options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, overrides", [
    (["train", TINY, "--resume", "auto", "training.max_steps=80"], ["training.max_steps=80"]),
    (["train", TINY, "a.b=1", "--resume", "auto", "c.d=2"], ["a.b=1", "c.d=2"]),
    (["train", "--resume", "auto", TINY, "a.b=1"], ["a.b=1"]),
    (["lr-find", TINY, "--steps", "3", "a.b=1", "--pick", "steepest", "c.d=2"], ["a.b=1", "c.d=2"]),
    (["prepare", TINY, "--out", "shards", "data.dedup=exact"], ["data.dedup=exact"]),
    (["config", "show", TINY, "--debug", "a.b=1"], ["a.b=1"]),
])
def test_overrides_are_taken_anywhere_after_the_config(argv, overrides):
    args = cli._parse_args(build_parser(), argv)
    assert args.overrides == overrides


@pytest.mark.parametrize("argv", [
    ["train", TINY, "--resume", "auto", "--bogus", "a.b=1"],  # an unknown option stays an error
    ["report", "runs/x", "a.b=1"],                             # a command without overrides
])
def test_unrecognized_arguments_are_still_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli._parse_args(build_parser(), argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and len(err.strip().splitlines()) == 1


def test_config_show_applies_an_override_placed_after_an_option(capsys):
    assert main(["config", "show", TINY, "--debug", "training.learning_rate=1e-4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["training"]["learning_rate"] == 1e-4


def _summary(stdout: str) -> dict:
    """The summary JSON ``ava train`` prints last (log lines may come before it)."""
    return json.loads(re.search(r"^\{$.*", stdout, re.M | re.S).group(0))


def test_resume_auto_then_an_override_trains_longer(tmp_path, corpus_cache, capsys):
    common = [f"run.output_dir={tmp_path}", f"data.cache_dir={corpus_cache}", "training.eval_every=2",
              "evaluation.sample_max_new_tokens=0"]
    assert main(["train", TINY, *common, "training.max_steps=2"]) == 0
    assert _summary(capsys.readouterr().out)["steps"] == 2
    assert main(["train", TINY, *common, "--resume", "auto", "training.max_steps=4"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step_2")
    assert len(list(tmp_path.iterdir())) == 1  # the same run folder


# --------------------------------------------------------------------------------------------
# --version
# --------------------------------------------------------------------------------------------


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ava {Ava.__version__}"


# --------------------------------------------------------------------------------------------
# signals: SIGINT exits 130 with the Ctrl-C hint, SIGTERM 143 with its own wording
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt, code, message", [
    (KeyboardInterrupt("SIGTERM"), 143, "terminated (SIGTERM)"),
    (KeyboardInterrupt("SIGINT"), 130, "interrupted"),
    (KeyboardInterrupt(), 130, "interrupted"),  # a second Ctrl-C, raised by Python itself
])
def test_exit_code_follows_the_signal(monkeypatch, capsys, interrupt, code, message):
    def stopped(args: argparse.Namespace) -> int:
        raise interrupt

    monkeypatch.setattr(cli, "cmd_train", stopped)
    assert main(["train", TINY]) == code
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("sig, hint", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_stop_signal_wording(caplog, sig, hint):
    from Ava.training.enhanced_trainer import EnhancedModularTrainer

    trainer = SimpleNamespace(_stop_signal=None, step=4)
    steps = EnhancedModularTrainer._stop_on_signals(trainer, iter([[], []]))
    before = signal.getsignal(sig)
    with caplog.at_level(logging.WARNING, logger="Ava.training.enhanced_trainer"):
        next(steps)
        os.kill(os.getpid(), sig)  # handled by the trainer: stop after this step
        assert trainer._stop_signal == sig.name
        steps.close()
    assert signal.getsignal(sig) is before
    (record,) = [r.getMessage() for r in caplog.records if "finishing step" in r.getMessage()]
    assert record.startswith(f"{sig.name}: finishing step 5, then saving a checkpoint and stopping")
    assert ("Ctrl-C" in record) is hint


# --------------------------------------------------------------------------------------------
# resuming with another run.name
# --------------------------------------------------------------------------------------------


def test_changed_run_name_on_resume_gives_the_real_reason():
    from Ava.config import EnhancedTrainingConfig
    from Ava.config.feature_compatibility import resume_changes
    from Ava.errors import AvaConfigError

    saved = EnhancedTrainingConfig().to_dict()
    renamed = EnhancedTrainingConfig.from_dict({"run": {"name": "other"}})
    with pytest.raises(AvaConfigError) as err:
        resume_changes(saved, renamed, "runs/ava_20261124-101500")
    message = str(err.value)
    assert message.startswith("cannot resume runs/ava_20261124-101500 with a changed run.name: 'ava' -> 'other': "
                              "run.name names the run folder (ava_20261124-101500)")
    assert "--resume auto" in message and "set run.name back to 'ava'" in message
    assert "changes what training computes" not in message

    both = EnhancedTrainingConfig.from_dict({"run": {"name": "other"}, "training": {"learning_rate": 0.5}})
    with pytest.raises(AvaConfigError) as err:
        resume_changes(saved, both, "runs/x")
    message = str(err.value)
    assert re.match(r"cannot resume runs/x with a changed training\.learning_rate: 0\.001 -> 0\.5: "
                    r"these change what training computes; .*; and a changed run\.name: 'ava' -> 'other': ",
                    message)


# --------------------------------------------------------------------------------------------
# the README's command block lists every subcommand
# --------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command path, e.g. ("train",), ("config", "check")."""
    found: set[tuple[str, ...]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subcommands(sub, (*prefix, name))
                found |= nested or {(*prefix, name)}
    return found


def _readme_command_lines() -> list[list[str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no ## Command line block"
    return [line.split("#")[0].split() for line in block.group(1).splitlines() if line.startswith("ava ")]


def test_readme_command_block_lists_every_subcommand_and_version():
    lines = _readme_command_lines()
    listed = set()
    for words in lines:
        commands = tuple(w for w in words[1:3] if not w.startswith("-"))
        for depth in (2, 1):
            if commands[:depth] in _subcommands(build_parser()):
                listed.add(commands[:depth])
                break
        else:
            assert words[1:] == ["--version"], f"README lists an unknown command: {' '.join(words)}"
    missing = _subcommands(build_parser()) - listed
    assert not missing, f"README's command block misses: {sorted(' '.join(c) for c in missing)}"
    assert ["ava", "--version"] in lines


def test_readme_quick_start_shows_the_installed_import_path_that_works_from_any_folder(tmp_path):
    """The Quick Start's ``from Ava...`` block, run outside the repository (training left out)."""
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quick_start, re.S)
    assert any("from src.Ava." in b for b in blocks), "the seed's src.Ava path stays in the Quick Start"
    (installed,) = [b for b in blocks if "from Ava." in b]
    script = installed.replace("/path/to/Ava/config.yaml", str(REPO / "config.yaml"))
    script = script.replace("trainer.train()", "print(type(trainer).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("EnhancedModularTrainer")

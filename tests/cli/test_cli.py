"""The ``ava`` command line: exit codes, one-line errors, config commands, generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from Ava.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def run_ava(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "Ava", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_typo_in_config_exits_2_with_one_line_and_no_traceback():
    result = run_ava("train", "configs/tiny.yaml", "model.hidden_sise=64")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "did you mean 'model.hidden_size'" in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback():
    result = run_ava("--debug", "config", "check", "configs/tiny.yaml", "model.moe.top_k=9")
    assert result.returncode != 0 and "Traceback" in result.stderr and "AvaConfigError" in result.stderr


def test_bad_yaml_file_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batch_size: [\n")
    assert main(["config", "check", str(bad)]) == 2
    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 2


def test_bad_cli_argument_exit_2():
    result = run_ava("generate", "runs/x", "--prompt", "a", "--top-p", "3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "configs/tiny.yaml", "training.learning_rate=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["learning_rate"] == 1e-4
    assert shown["model"]["intermediate_size"] == 192 and shown["model"]["vocab_size"] == 512


def test_config_check_and_schema(capsys):
    assert main(["config", "check", "configs/tiny.yaml"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "model" in schema["properties"] and "$defs" in schema


def test_generate_from_run_folder(trained_run):
    _, summary = trained_run
    result = run_ava("generate", summary.run_dir, "--prompt", "The", "--max-new-tokens", "8",
                     "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The")
    again = run_ava("generate", summary.run_dir, "--prompt", "The", "--max-new-tokens", "8",
                    "--temperature", "0", "--no-cache")
    assert again.stdout == result.stdout


def test_generate_missing_run_is_a_clear_error(tmp_path):
    result = run_ava("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_cli_defaults_come_from_the_config_schema():
    from Ava.cli.main import build_parser
    from Ava.config import EvaluationConfig, SourceConfig

    parser = build_parser()
    gen = parser.parse_args(["generate", "run", "--prompt", "x"])
    assert gen.temperature == EvaluationConfig.model_fields["sample_temperature"].default
    tok = parser.parse_args(["tokenizer", "train", "a.txt", "--out", "t.json"])
    assert tok.format == SourceConfig.model_fields["format"].default
    assert tok.text_field == SourceConfig.model_fields["text_field"].default


def test_config_check_reports_an_unwritable_output_dir(unwritable_dir, capsys):
    assert main(["config", "check", "configs/tiny.yaml", f"run.output_dir={unwritable_dir}/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.output_dir {unwritable_dir}/runs: cannot write to") and "\n" not in err

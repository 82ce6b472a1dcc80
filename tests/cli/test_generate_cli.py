"""``ava generate``: --file JSONL, --interactive REPL (fed through stdin), --stream, sampling flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

from Ava.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def run_ava(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "Ava", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_file_mode_writes_one_jsonl_row_per_prompt(trained_run, tmp_path, capsys):
    _, summary = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\n\nROMEO:\\nThe moon\nA\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(summary.run_dir), "--file", str(prompts), "--out", str(out), "--temperature", "0",
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The king", "ROMEO:\nThe moon", "A"]
    assert main(["generate", str(summary.run_dir), "--prompt", "A", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "A" + rows[2]["completion"] + "\n"


def test_stream_prints_the_same_text(trained_run, capsys):
    _, summary = trained_run
    common = ["generate", str(summary.run_dir), "--prompt", "The", "--max-new-tokens", "10", "--seed", "3",
              "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(common[:4] + ["--num-beams", "3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_interactive_repl_survives_bad_input(trained_run):
    _, summary = trained_run
    script = "\n".join([
        ":set temperature 0",
        ":set top_p 7",  # invalid value: an error, the REPL goes on
        ":set nonsense 1",
        ":bogus",
        ":set max_new_tokens 5",
        "The king",
        ":show",
        ":quit",
        "never reached",
    ]) + "\n"
    result = run_ava("generate", str(summary.run_dir), "--interactive", stdin=script)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "top_p" in errors[0]
    assert "The king" in result.stdout and '"max_new_tokens": 5' in result.stdout
    assert "never reached" not in result.stdout


def test_generate_needs_exactly_one_input_mode(trained_run):
    _, summary = trained_run
    result = run_ava("generate", str(summary.run_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1

"""``ava generate``: --file JSONL, --interactive REPL (fed through stdin), --stream, sampling flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from Ava.cli.generation_commands import check_device
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
    assert capsys.readouterr().out == f"wrote 3 completions to {out}\n"  # where the results went
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


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _prompts(tmp_path, text: str = "The king\nA\nROMEO:\n") -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_prompt_file_is_an_error_naming_it(text, tmp_path, capsys):
    """Checked before the model loads: the run path does not even exist."""
    prompts = _prompts(tmp_path, text)
    assert main(["generate", str(tmp_path / "no_run"), "--file", str(prompts)]) == 2
    line = _one_error_line(capsys)
    assert f"--file {prompts}: no prompts" in line


def test_file_mode_to_stdout_says_so_on_stderr_and_shows_progress(trained_run, tmp_path, capsys, monkeypatch):
    import Ava.utils.progress as progress

    shown = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda *a, **kw: shown(*a, **{**kw, "show": True}))
    _, summary = trained_run
    assert main(["generate", str(summary.run_dir), "--file", str(_prompts(tmp_path)), "--temperature", "0",
                 "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["prompt"] for line in captured.out.splitlines()] == ["The king", "A", "ROMEO:"]
    assert "generate: 100%" in captured.err and "3/3" in captured.err  # the bar over prompts, full at the end
    assert captured.err.rstrip().endswith("wrote 3 completions (JSONL) to stdout")


def test_one_prompt_is_counted_in_the_singular(trained_run, tmp_path, capsys):
    _, summary = trained_run
    out = tmp_path / "nested" / "one.jsonl"  # a missing parent folder is created
    assert main(["generate", str(summary.run_dir), "--file", str(_prompts(tmp_path, "A\n")), "--out", str(out),
                 "--temperature", "0", "--max-new-tokens", "2", "--num-beams", "2"]) == 0
    assert capsys.readouterr().out == f"wrote 1 completion to {out}\n"
    assert len(out.read_text().splitlines()) == 1


def _unwritable_outs(tmp_path, unwritable_dir) -> dict[str, Path]:
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    (tmp_path / "a_folder").mkdir()
    return {"read-only folder": unwritable_dir / "out.jsonl", "file in the way": blocker / "out.jsonl",
            "a folder": tmp_path / "a_folder"}


def test_unwritable_out_is_refused_before_loading(tmp_path, unwritable_dir, capsys):
    """The run path does not exist: a refusal about --out proves nothing was loaded first."""
    for case, out in _unwritable_outs(tmp_path, unwritable_dir).items():
        assert main(["generate", str(tmp_path / "no_run"), "--file", str(_prompts(tmp_path)),
                     "--out", str(out)]) == 2, case
        line = _one_error_line(capsys)
        assert line.startswith("error: --out ") and ("pick" in line or "give a file name" in line), (case, line)
    assert not (tmp_path / "a_file").is_dir()


def test_out_without_file_is_refused(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no_run"), "--prompt", "A", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--out is where --file writes" in _one_error_line(capsys)
    assert not (tmp_path / "x.jsonl").exists()


def test_speculative_with_beams_is_refused_before_loading(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no_run"), "--file", str(_prompts(tmp_path)), "--num-beams", "2",
                 "--speculative", "--temperature", "0"]) == 2
    assert "--speculative is greedy decoding" in _one_error_line(capsys)


def test_missing_path_and_run_without_checkpoint_get_different_messages(tmp_path, capsys):
    missing = tmp_path / "no_run"
    assert main(["generate", str(missing), "--prompt", "A"]) == 2
    assert "does not exist" in _one_error_line(capsys)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    for command in (["generate", str(run), "--prompt", "A"], ["export", str(run), "--out", str(tmp_path / "hf")]):
        assert main(command) == 2
        line = _one_error_line(capsys)
        assert "holds no checkpoint yet" in line and "does not exist" not in line, line


def test_cuda_device_count_is_pluralised(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Exception, match="this machine has 1 CUDA device;"):
        check_device("cuda:1")

"""CLI guards: ``export``/``import`` refuse a non-empty ``--out`` without ``--force``; ``--device cuda``
without CUDA is one line; the REPL's ``:stop`` decodes escapes as ``--stop`` does."""

import io

import pytest
import torch

from Ava.cli import generation_commands
from Ava.cli.generation_commands import _repl_command
from Ava.cli.main import build_parser, main


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def busy_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


@pytest.fixture
def no_interop(monkeypatch):
    """The refusal must come before any loading: calling the interop functions fails the test."""
    import Ava.interop as interop

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded weights before checking --out")

    monkeypatch.setattr(interop, "export_hf", forbidden)
    monkeypatch.setattr(interop, "import_hf", forbidden)


@pytest.mark.parametrize("command", ["export", "import"])
def test_non_empty_out_is_refused_before_any_work(command, busy_out, tmp_path, capsys, no_interop):
    source = tmp_path / "does_not_exist"  # would be the error if anything were loaded first
    assert main([command, str(source), "--out", str(busy_out)]) == 2
    line = _one_error_line(capsys)
    assert f"--out {busy_out}" in line and "non-empty" in line and "--force" in line
    assert sorted(p.name for p in busy_out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["export", "import"])
def test_out_that_is_a_file_is_refused(command, tmp_path, capsys, no_interop):
    target = tmp_path / "file"
    target.write_text("x")
    assert main([command, str(tmp_path / "src"), "--out", str(target), "--force"]) == 2
    assert "is a file" in _one_error_line(capsys)


def test_force_writes_into_a_non_empty_out(busy_out, tmp_path, monkeypatch):
    import Ava.interop as interop

    calls = []
    monkeypatch.setattr(interop, "export_hf", lambda path, out, **kw: calls.append(("export", out)))
    assert main(["export", str(tmp_path / "run"), "--out", str(busy_out), "--force"]) == 0
    assert calls == [("export", str(busy_out))]


def test_empty_or_missing_out_needs_no_force(tmp_path, monkeypatch):
    import Ava.interop as interop

    calls = []
    monkeypatch.setattr(interop, "export_hf", lambda path, out, **kw: calls.append(out))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert len(calls) == 2


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_one_line(command, device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [command[0], str(tmp_path / "no_run"), *command[1:], "--device", device]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"--device {device}" in line and "no CUDA device" in line and "--device cpu" in line


def test_unknown_device_is_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no_run"), "--prompt", "hi", "--device", "gpu"]) == 2
    assert "--device 'gpu'" in _one_error_line(capsys)


def test_device_check_passes_for_cpu():
    generation_commands.check_device("cpu")  # no error


@pytest.mark.parametrize(("typed", "stored"), [
    (r":stop \n", "\n"),
    (r":stop \n\n", "\n\n"),
    (r":stop \t", "\t"),
    (r':stop "\n"', "\n"),
    (r":stop END\n", "END\n"),
    (r":stop a\\n", "a\\n"),
    (":stop it's", "it's"),
    (r":stop C:\path", "C:\\path"),
    (':stop " x "', " x "),
])
def test_repl_stop_decodes_escapes_like_the_stop_flag(typed, stored):
    opts = {"stop_strings": []}
    assert _repl_command(typed, opts, io.StringIO()) is False
    assert opts["stop_strings"] == [stored]
    flag = build_parser().parse_args(["generate", "run", "--prompt", "p", "--stop", typed[len(":stop "):]]).stop
    if not typed.endswith('"'):
        assert flag == [stored]  # the same decoding as --stop (the REPL also strips outer quotes)


def test_repl_stop_without_text_clears():
    opts = {"stop_strings": ["x"]}
    _repl_command(":stop", opts, io.StringIO())
    assert opts["stop_strings"] == []

"""Loads of a checkpoint check its manifest (``--no-verify`` skips it, with a warning); weights files
get the same mode as every other file Ava writes."""

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from Ava.cli.main import main
from Ava.config.checkpoint_layout import CONFIG_FILE, WEIGHTS_FILE, resolve_checkpoint
from Ava.errors import AvaCheckpointError
from Ava.models import EnhancedMoEModel
from Ava.utils.checkpoint import verify_checkpoint


@pytest.fixture
def damaged_checkpoint(trained_run, tmp_path) -> Path:
    """A copy of the trained run's latest checkpoint with 400 bytes of its weights flipped (size kept)."""
    _, summary = trained_run
    folder = tmp_path / "step_damaged"
    shutil.copytree(resolve_checkpoint(summary.run_dir), folder)
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 400, len(data)):  # the last tensor's bytes, not the header
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_from_pretrained_refuses_damaged_weights(damaged_checkpoint, caplog):
    with pytest.raises(AvaCheckpointError, match=r"model\.safetensors fails its sha256 check.*--no-verify"):
        EnhancedMoEModel.from_pretrained(damaged_checkpoint)
    assert verify_checkpoint(damaged_checkpoint)  # the training side sees the same problem
    model = EnhancedMoEModel.from_pretrained(damaged_checkpoint, verify=False)
    assert isinstance(model, EnhancedMoEModel)


def test_from_pretrained_reports_truncated_weights(damaged_checkpoint):
    weights = damaged_checkpoint / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AvaCheckpointError, match=r"model\.safetensors has \d+ bytes, expected \d+"):
        EnhancedMoEModel.from_pretrained(damaged_checkpoint)


def test_folders_without_manifest_load_unchecked(trained_run, tmp_path):
    trainer, summary = trained_run
    folder = EnhancedMoEModel.from_pretrained(summary.run_dir).save_pretrained(tmp_path / "plain")
    assert EnhancedMoEModel.from_pretrained(folder) is not None


@pytest.mark.parametrize("command", [
    ["generate", "{ckpt}", "--prompt", "The", "--temperature", "0", "--max-new-tokens", "3"],
    ["eval", "{ckpt}", "--data", "{text}", "--samples", "0", "--max-tokens", "64", "--out", "{tmp}/report"],
    ["export", "{ckpt}", "--format", "hf", "--out", "{tmp}/hf"],
])
def test_cli_refuses_damaged_checkpoint_unless_no_verify(damaged_checkpoint, tmp_path, capsys, command):
    text = tmp_path / "eval.txt"
    text.write_text("The king is dead. Long live the king.\n" * 20)
    argv = [a.format(ckpt=damaged_checkpoint, text=text, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{damaged_checkpoint / WEIGHTS_FILE} fails its sha256 check" in err
    assert "earlier checkpoint" in err and "--no-verify" in err
    if command[0] == "export":
        assert not (tmp_path / "hf" / WEIGHTS_FILE).exists()

    assert main(argv + ["--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "--no-verify" in captured.out + captured.err  # the warning


def test_weights_get_the_mode_of_other_files(trained_run, tmp_path):
    _, summary = trained_run
    old = os.umask(0o022)
    try:
        checkpoint = resolve_checkpoint(summary.run_dir)
        plain = EnhancedMoEModel.from_pretrained(checkpoint).save_pretrained(tmp_path / "plain")
        assert main(["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
        from Ava.interop import import_hf

        import_hf(tmp_path / "hf", tmp_path / "imported")
    finally:
        os.umask(old)
    assert _mode(checkpoint / WEIGHTS_FILE) == _mode(checkpoint / CONFIG_FILE)  # written by the trainer
    assert _mode(plain / WEIGHTS_FILE) == _mode(plain / CONFIG_FILE) == 0o644
    assert _mode(tmp_path / "hf" / WEIGHTS_FILE) == _mode(tmp_path / "hf" / "config.json") == 0o644
    assert _mode(tmp_path / "imported" / WEIGHTS_FILE) == _mode(tmp_path / "imported" / CONFIG_FILE) == 0o644


def test_weights_mode_follows_the_umask(tmp_path):
    from Ava.config import ModelConfig
    from Ava.utils.checkpoint import take_snapshot, write_checkpoint

    model = EnhancedMoEModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                         num_kv_heads=1, intermediate_size=64, max_seq_len=16))
    old = os.umask(0o027)
    try:
        folder = write_checkpoint(tmp_path / "ckpts", take_snapshot(1, model, "model: {}\n", {}))
    finally:
        os.umask(old)
    assert _mode(folder / WEIGHTS_FILE) == _mode(folder / CONFIG_FILE) == 0o640
    assert torch.load(folder / "state.pt", weights_only=True)["step"] == 1

"""``ava export`` / ``ava import``: output locations checked before any work, a progress bar over
the tensors, and a final line saying what was written where (counts in the singular for one)."""

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.errors import AvaOutputError
from Ava.interop import export_hf, import_hf
from Ava.interop.huggingface import size_text
from Ava.models import EnhancedMoEModel

TEXTS = ["the king loves the stars and the queen fears the night"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return AvaTokenizer.train(TEXTS, vocab_size=300, min_frequency=1)


def _checkpoint(folder, tokenizer, num_layers: int = 2):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, num_experts=4, max_seq_len=64, intermediate_size=48, qk_norm=False,
                      moe={"top_k": 2, "moe_intermediate_size": 24, "norm_topk_prob": True})
    torch.manual_seed(0)
    EnhancedMoEModel(cfg).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _bad_outs(tmp_path, unwritable_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    return {"read-only folder": unwritable_dir / "out", "file in the way": blocker / "out", "a file": blocker}


@pytest.mark.parametrize("command", ["export", "import"])
def test_unwritable_out_is_refused_before_any_work(command, tmp_path, unwritable_dir, capsys, monkeypatch):
    import Ava.interop as interop

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded weights before checking --out")

    monkeypatch.setattr(interop, "export_hf", forbidden)
    monkeypatch.setattr(interop, "import_hf", forbidden)
    for case, out in _bad_outs(tmp_path, unwritable_dir).items():
        assert main([command, str(tmp_path / "src"), "--out", str(out)]) == 2, case
        line = _one_error_line(capsys)
        assert line.startswith(f"error: --out {out}:") and "pick" in line, (case, line)
    assert (tmp_path / "a_file").read_text() == "in the way"


def test_library_export_and_import_check_out_before_loading(tmp_path, unwritable_dir):
    """Called from Python, too: the missing source would be the error if anything were read first."""
    with pytest.raises(AvaOutputError, match="cannot write"):
        export_hf(tmp_path / "missing_run", unwritable_dir / "hf")
    with pytest.raises(AvaOutputError, match="cannot write"):
        import_hf(tmp_path / "missing_hf", unwritable_dir / "ava")


def test_export_and_import_show_progress_over_tensors(tmp_path, tokenizer, capsys):
    source = _checkpoint(tmp_path / "ava", tokenizer)
    n_tensors = len(EnhancedMoEModel.from_pretrained(source).state_dict())
    export_hf(source, tmp_path / "hf", progress=True)
    err = capsys.readouterr().err
    assert "export: writing model.safetensors" in err and f"{n_tensors}/{n_tensors}" in err
    import_hf(tmp_path / "hf", tmp_path / "back", progress=True)
    err = capsys.readouterr().err
    assert "import: reading" in err and "100%" in err


def test_cli_export_and_import_say_what_they_wrote_where(tmp_path, tokenizer, capsys):
    source = _checkpoint(tmp_path / "ava", tokenizer, num_layers=1)
    hf = tmp_path / "hf"
    assert main(["export", str(source), "--out", str(hf)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    size = sum(p.stat().st_size for p in hf.iterdir())
    assert f"to {hf} (6 files, {size_text(size)})" in last and "MixtralForCausalLM" in last, last
    back = tmp_path / "back"
    assert main(["import", str(hf), "--out", str(back)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    size = sum(p.stat().st_size for p in back.iterdir())
    assert "(1 layer, 4 experts)" in line and f"to {back} (3 files, {size_text(size)})" in line, line


def test_size_text():
    assert [size_text(n) for n in (0, 300, 5 * 2**10, 3 * 2**20 + 2**19, 2**31)] == [
        "0 KiB", "1 KiB", "5 KiB", "3.5 MiB", "2.0 GiB"]

"""``ava tokenizer train``: the file it writes, special tokens, config sources, one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from Ava.cli.main import main
from Ava.config import DataConfig
from Ava.data.datasets import build_tokenizer
from Ava.data.tokenizer import AvaTokenizer

WORDS = "the king queen loves stars night moon sword crown castle river brave fool speaks".split()


def _text(seed: int, lines: int = 40) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(lines)) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder with two text files and a JSONL file (4 documents in all)."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(_text(0), encoding="utf-8")
    (root / "b.txt").write_text(_text(1), encoding="utf-8")
    rows = [{"text": _text(2, 5)}, {"text": _text(3, 5)}]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_trains_and_writes_tokenizer_with_special_tokens(corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "tok" / "tokenizer.json"
    code = main(["tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "300",
                 "--special-token", "<|im_start|>", "--special-token", "<|im_end|>",
                 "--special-token", "<|endoftext|>"])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]  # log lines (progress) come first
    assert summary.startswith("trained a byte-level BPE with ")
    assert "4 documents" in summary and "(asked for 300)" in summary and summary.endswith(str(out))
    assert out.is_file() and not list(out.parent.glob("*.partial")) and not list(out.parent.glob(".ava-*"))
    tok = AvaTokenizer.from_file(out)
    assert 262 <= tok.vocab_size <= 300
    ids = {t: tok.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")}
    assert ids == {"<|endoftext|>": 0, "<|pad|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    assert tok.eos_id == 0 and tok.pad_id == 1
    text = "The brave fool speaks to the moon. ünïcødé 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the king loves the queen")) < len("the king loves the queen")


def test_trained_tokenizer_loads_through_data_tokenizer_path(corpus: Path, tmp_path: Path):
    out = tmp_path / "tokenizer.json"
    assert main(["tokenizer", "train", str(corpus / "*.txt"), "--out", str(out), "--vocab-size", "300"]) == 0
    data = DataConfig(tokenizer=str(out))  # the `data.tokenizer: path` shorthand
    tokenizer, origin = build_tokenizer(data, [])
    assert origin == str(out) and tokenizer.vocab_size <= 300 and tokenizer.eos_id == 0
    text = _text(7, 3) + "ünïcødé 🙂 <|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.eos_id not in ids


def test_out_folder_gets_tokenizer_json(corpus: Path, tmp_path: Path):
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["tokenizer", "train", str(corpus / "a.txt"), "--out", str(folder), "--vocab-size", "280"]) == 0
    assert AvaTokenizer.from_file(folder / "tokenizer.json").vocab_size <= 280


def test_config_sources_and_tokenizer_defaults(corpus: Path, tmp_path: Path, capsys):
    config = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    config["data"] = {"sources": [{"path": str(corpus / "c.jsonl")}, {"path": str(corpus / "a.txt")}],
                      "tokenizer": {"vocab_size": 270, "min_frequency": 1}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "from_config.json"
    assert main(["tokenizer", "train", "--config", str(config_path), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "3 documents" in summary and "(asked for 270)" in summary
    assert AvaTokenizer.from_file(out).vocab_size == 270


def test_missing_source_exits_2_with_one_line_and_writes_nothing(corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "tokenizer.json"
    code = main(["tokenizer", "train", str(corpus / "a.txt"), str(tmp_path / "missing.txt"), "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "missing.txt" in line and "does not exist" in line
    assert not out.exists()


def test_glob_matching_nothing_exits_2(tmp_path: Path, capsys):
    assert main(["tokenizer", "train", str(tmp_path / "*.txt"), "--out", str(tmp_path / "t.json")]) == 2
    assert "*.txt" in _one_error_line(capsys)


def test_empty_data_exits_2(tmp_path: Path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["tokenizer", "train", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t.json")]) == 2
    assert "empty.txt" in _one_error_line(capsys)
    assert not (tmp_path / "t.json").exists()


def test_unwritable_output_exits_2(corpus: Path, tmp_path: Path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["tokenizer", "train", str(corpus), "--out", str(blocker / "tokenizer.json")]) == 2
    line = _one_error_line(capsys)
    assert "--out" in line and "a_file" in line and "writable" in line


def test_bad_arguments_exit_2(corpus: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "t.json")
    assert main(["tokenizer", "train", str(corpus), "--out", out, "--vocab-size", "100"]) == 2
    assert "use at least 258" in _one_error_line(capsys)
    assert main(["tokenizer", "train", "--out", out]) == 2
    assert "no sources" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "train", str(corpus)])  # --out is required: an argparse error
    assert exc.value.code == 2
    assert "--out" in _one_error_line(capsys)


def test_config_without_sources_exits_2(tmp_path: Path, capsys):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(Path("configs/tiny.yaml").read_text())
    assert main(["tokenizer", "train", "--config", str(config_path), "--out", str(tmp_path / "t.json")]) == 2
    assert "data.sources is empty" in _one_error_line(capsys)


def test_foreign_tokenizer_json_with_other_special_tokens_loads(tmp_path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    foreign.train_from_iterator([_text(4)], trainer=trainer)
    path = tmp_path / "foreign" / "tokenizer.json"
    path.parent.mkdir()
    foreign.save(str(path))
    tokenizer, _ = build_tokenizer(DataConfig(tokenizer={"path": str(path)}), [])
    assert (tokenizer.eos_id, tokenizer.pad_id) == (2, 1)  # </s> and <pad>
    text = "The moon speaks. </s> stays text"
    assert tokenizer.decode(tokenizer.encode(text)) == text

"""``ava prepare``: shards from a config, the summary, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from Ava.cli.main import main
from Ava.data.shards import load_prepared
from Ava.data.tokenizer import AvaTokenizer
from tests.helpers import fake_play

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with two sources: plain JSONL (with a duplicate) and chat JSONL (loss masks)."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "plays.jsonl", "w", encoding="utf-8") as f:
        for i in range(12):
            f.write(json.dumps({"text": fake_play(i, num_lines=8)}) + "\n")
        f.write(json.dumps({"text": fake_play(0, num_lines=8)}) + "\n")  # exact duplicate of row 1
    with open(data / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            messages = [{"role": "user", "content": f"Tell me of play {i}."},
                        {"role": "assistant", "content": fake_play(100 + i, num_lines=2)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    cfg = {
        "model": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_experts": 2, "max_seq_len": 64},
        "data": {
            "sources": [
                {"path": str(data / "plays.jsonl"), "weight": 3.0},
                {"path": str(data / "chat.jsonl"), "name": "chat", "chat": {}},
            ],
            "tokenizer": {"vocab_size": 400},
            "val_fraction": 0.2,
        },
        "run": {"seed": 5},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prepare_writes_shards_and_prints_a_summary(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "prep"
    assert main(["prepare", str(config), "data.dedup=exact", "--out", str(out), "--shard-tokens", "1500",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    corpus = load_prepared(out)
    manifest = corpus.manifest
    assert corpus.source_names == ["plays", "chat"] and corpus.weights == {"plays": 3.0, "chat": 1.0}
    assert manifest["seed"] == 5 and manifest["tokenizer_source"] == "trained"
    assert manifest["shard_tokens"] == 1500
    assert manifest["dedup"]["exact_removed"] == 1
    assert manifest["totals"]["documents"] == 12 + 6
    assert manifest["sources"]["chat"]["config"]["chat"]["template"] == "chatml"
    assert manifest["data_config"]["dedup"] == "exact"
    assert manifest["splits"]["train"]["sources"]["chat"]["has_mask"] is True
    assert manifest["splits"]["train"]["sources"]["plays"]["has_mask"] is False
    assert len(manifest["splits"]["train"]["sources"]["plays"]["shards"]) > 1
    for split in ("train", "val"):
        for name in ("plays", "chat", "(all)"):
            e = manifest["splits"][split]["sources"].get(name) or manifest["splits"][split]
            shards = len(e["shards"]) if "shards" in e else sum(len(s["shards"]) for s in e["sources"].values())
            row = rf"^{split}\s+{re.escape(name)}\s+{e['documents']:,}\s+{e['tokens']:,}\s+{shards}$"
            assert re.search(row, printed, re.M), (row, printed)
    assert f"prepared 18 documents, {manifest['totals']['tokens']:,} tokens in" in printed
    assert "tokens/s" in printed and str(out) in printed
    # the data profile is written into the folder (before the manifest) and shown
    assert manifest["profile"] == {"json": "profile.json", "png": "profile.png"}
    profile = json.loads((out / "profile.json").read_text())
    assert profile["documents"] == 18 and profile["tokens"] == manifest["totals"]["tokens"]
    assert profile["sources"]["plays"]["tokens"] == sum(
        manifest["splits"][s]["sources"]["plays"]["tokens"] for s in ("train", "val"))
    assert profile["duplicates"]["exact_removed"] == 1
    assert (out / "profile.png").stat().st_size > 0
    assert "data profile" in printed and "removed by dedup (exact) 1 exact" in printed


def test_existing_output_needs_force(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "prep"
    assert main(["prepare", str(config), "--out", str(out)]) == 0
    created = load_prepared(out).manifest["created"]
    capsys.readouterr()
    assert main(["prepare", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a prepared folder; pass --force" in err
    assert load_prepared(out).manifest["created"] == created
    assert main(["prepare", str(config), "--out", str(out), "--force", "--shard-tokens", "999"]) == 0
    assert load_prepared(out).manifest["shard_tokens"] == 999


def test_prepare_with_a_given_tokenizer(config: Path, tmp_path: Path):
    tok = AvaTokenizer.train([fake_play(i) for i in range(3)], vocab_size=300)
    tok_path = tok.save(tmp_path / "mine.json")
    out = tmp_path / "prep"
    assert main(["prepare", str(config), "--out", str(out), "--tokenizer", str(tok_path), "--no-profile"]) == 0
    corpus = load_prepared(out)
    assert corpus.manifest["tokenizer_source"] == str(tok_path)
    assert "profile" not in corpus.manifest and not (out / "profile.json").exists()
    assert corpus.tokenizer.tokenizer.to_str() == tok.tokenizer.to_str()


@pytest.mark.parametrize("case", ["missing config", "prepared config", "missing source", "not a prepared folder",
                                  "out is a file", "missing tokenizer"])
def test_user_errors_exit_2_with_one_line(case: str, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out, args = tmp_path / "prep", []
    if case == "missing config":
        config, expected = tmp_path / "nope.yaml", "config file not found"
    elif case == "prepared config":
        args, expected = ["data.sources=[]", f"data.prepared={tmp_path}"], "data.prepared is set"
    elif case == "missing source":
        args, expected = [f"data.sources.0.path={tmp_path / 'gone.jsonl'}"], "gone.jsonl"
    elif case == "not a prepared folder":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        args, expected = ["--force"], "not a prepared folder (no manifest.json); choose another --out"
    elif case == "out is a file":
        out.write_text("x")
        expected = "is a file"
    else:
        args, expected = ["--tokenizer", str(tmp_path / "tok.json")], "tok.json is not a file"
    assert main(["prepare", str(config), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_bad_arguments_exit_2(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    for argv in (["prepare", str(config)],  # --out is required
                 ["prepare", str(config), "--out", str(tmp_path / "p"), "--shard-tokens", "0"],
                 ["prepare", str(config), "--out", str(tmp_path / "p"), "--workers", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_command_line_error_has_no_traceback(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "Ava", "prepare", str(tmp_path / "missing.yaml"),
                             "--out", str(tmp_path / "p")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_training_data_from_shards_equals_in_memory_data(config: Path, tmp_path: Path):
    """The same windows (ids, labels, positions) whether the trainer reads sources or shards."""
    from Ava.config import load_config
    from Ava.data.pipeline import prepare_data

    out = tmp_path / "prep"
    assert main(["prepare", str(config), "--out", str(out), "--no-profile"]) == 0
    memory = prepare_data(load_config(config, ["data.seq_len=32"]).data, seed=5)
    shards = prepare_data(load_config(config, ["data.seq_len=32", "data.sources=[]", f"data.prepared={out}"]).data,
                          seed=5)
    assert shards.tokenizer.tokenizer.to_str() == memory.tokenizer.tokenizer.to_str()
    for split in ("train", "val"):
        a, b = getattr(memory, split), getattr(shards, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            for key, value in a[i].items():
                np.testing.assert_array_equal(value.numpy(), b[i][key].numpy(), err_msg=f"{split}[{i}][{key}]")


def test_rows_skipped_at_prepare_are_reported_by_the_run_that_trains_on_the_shards(config: Path, tmp_path: Path):
    from Ava.config import load_config
    from Ava.data.pipeline import prepare_data

    plays = tmp_path / "data" / "plays.jsonl"
    plays.write_text(plays.read_text() + "{not json\n")
    out = tmp_path / "prep"
    overrides = ["data.sources.0.bad_rows=skip"]
    assert main(["prepare", str(config), *overrides, "--out", str(out), "--no-profile"]) == 0
    shards = prepare_data(load_config(config, ["data.seq_len=32", "data.sources=[]", f"data.prepared={out}"]).data,
                          seed=5)
    assert shards.report.to_dict() == {"plays": {"skipped rows (malformed JSON)": 1}}


def test_an_unwritable_out_fails_before_reading_anything(config: Path, unwritable_dir: Path,
                                                          capsys: pytest.CaptureFixture):
    assert main(["prepare", str(config), "--out", str(unwritable_dir / "prepared")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "cannot write to" in err and "\n" not in err

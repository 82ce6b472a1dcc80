"""prepare_data end to end on the fake archive and on a user source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from Ava.config import DataConfig, EnhancedTrainingConfig, TokenizerConfig
from Ava.data import AvaTokenizer, Document, prepare_data, split_documents
from Ava.errors import AvaDataError


def test_prepare_data_on_embedded_corpus(fake_cache: Path, tmp_path: Path, fake_docs):
    data = DataConfig(cache_dir=str(fake_cache), seq_len=32, val_fraction=0.2,
                      tokenizer={"vocab_size": 512})
    out = tmp_path / "run" / "tokenizer.json"
    prepared = prepare_data(data, seed=1337, tokenizer_out=out)

    s = prepared.stats
    assert (s["train_documents"], s["val_documents"]) == (5, 1)
    assert s["train_chars"] + s["val_chars"] == sum(len(t) for t in fake_docs.values())
    assert s["tokenizer_source"] == "trained" and s["vocab_size"] == prepared.tokenizer.vocab_size <= 512
    assert s["train_tokens"] == prepared.train.num_tokens and s["val_tokens"] == prepared.val.num_tokens
    assert len(prepared.train) == s["train_tokens"] // 32 > 0 and len(prepared.val) > 0

    # The packed stream decodes back to the documents, each followed by EOS.
    tok = prepared.tokenizer
    stream = prepared.train.tokens.tolist()
    assert stream.count(tok.eos_id) == 5 and stream[-1] == tok.eos_id
    val_text = tok.decode(prepared.val.tokens.tolist()).removesuffix("<|endoftext|>")
    val_name = next(name for name, text in fake_docs.items() if text == val_text)
    train_texts = tok.decode(stream).split("<|endoftext|>")[:-1]
    assert train_texts == [fake_docs[name] for name in sorted(fake_docs) if name != val_name]

    saved = AvaTokenizer.from_file(out)
    assert saved.encode("ROMEO: the king") == tok.encode("ROMEO: the king")

    again = prepare_data(data, seed=1337)
    assert (again.train.tokens == prepared.train.tokens).all()
    assert (again.val.tokens == prepared.val.tokens).all()


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    names = [f"d{i}.txt" for i in range(4)]
    # documents are named after their source (the folder): src/d0.txt, ...
    _, val = split_documents([Document(f"src/{n}", "", "") for n in names], 0.25, seed=0)
    for name in names:
        # The validation document is the only one with this word.
        text = "zyxwvutsrq " * 200 if f"src/{name}" == val[0].name else "common words here. " * 40
        (src / name).write_text(text)
    data = DataConfig(sources=[{"path": str(src)}], seq_len=8, val_fraction=0.25,
                      tokenizer={"vocab_size": 300, "min_frequency": 1})
    prepared = prepare_data(data, seed=0)
    assert prepared.stats["val_documents"] == 1
    assert "zyxwvutsrq" in prepared.tokenizer.decode(prepared.val.tokens.tolist())
    assert len(prepared.tokenizer.encode(" zyxwvutsrq")) >= 8  # never merged: unseen in training

    # Control: trained on everything, the word does collapse into few tokens.
    everything = prepare_data(data.model_copy(update={"val_fraction": 0.0}), seed=0)
    assert len(everything.tokenizer.encode(" zyxwvutsrq")) <= 2


def test_prepare_data_with_loaded_tokenizer_and_no_val(fake_cache: Path, tmp_path: Path):
    base = DataConfig(cache_dir=str(fake_cache), seq_len=16, tokenizer={"vocab_size": 300})
    first = prepare_data(base, seed=0, tokenizer_out=tmp_path / "tok.json")
    data = base.model_copy(update={"val_fraction": 0.0, "tokenizer": TokenizerConfig(path=str(tmp_path / "tok.json"))})
    prepared = prepare_data(data, seed=0, tokenizer_out=tmp_path / "copy" / "tokenizer.json")
    assert prepared.val is None and prepared.stats["val_documents"] == 0
    assert prepared.stats["tokenizer_source"] == str(tmp_path / "tok.json")
    assert prepared.tokenizer.vocab_size == first.tokenizer.vocab_size
    copied = json.loads((tmp_path / "copy" / "tokenizer.json").read_text())
    assert copied == json.loads((tmp_path / "tok.json").read_text())


def test_prepare_data_errors(fake_cache: Path, tmp_path: Path):
    base = DataConfig(cache_dir=str(fake_cache), seq_len=16, tokenizer={"vocab_size": 300})
    with pytest.raises(AvaDataError, match="lower data.seq_len or add data"):
        prepare_data(base.model_copy(update={"seq_len": 100_000}), seed=0)
    missing = TokenizerConfig(path=str(tmp_path / "none.json"))
    with pytest.raises(AvaDataError, match="does not exist"):
        prepare_data(base.model_copy(update={"tokenizer": missing}), seed=0)
    with pytest.raises(AvaDataError, match="seq_len is not set"):
        prepare_data(DataConfig(cache_dir=str(fake_cache)), seed=0)


def test_single_document_has_no_val_split(tmp_path: Path):
    f = tmp_path / "one.txt"
    f.write_text("just one document " * 50)
    data = DataConfig(sources=[{"path": str(f)}], seq_len=8, tokenizer={"vocab_size": 300})
    prepared = prepare_data(data, seed=0)
    assert prepared.val is None and prepared.stats["train_documents"] == 1


def test_seq_len_comes_from_model_max_seq_len(fake_cache: Path):
    cfg = EnhancedTrainingConfig.from_dict(
        {"model": {"max_seq_len": 24},
         "data": {"cache_dir": str(fake_cache), "tokenizer": {"vocab_size": 300}}}
    )
    prepared = prepare_data(cfg.data, seed=cfg.run.seed)
    assert prepared.train[0]["input_ids"].shape == (24,)

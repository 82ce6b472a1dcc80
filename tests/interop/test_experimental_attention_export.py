"""HF and GGUF export refuse the experimental attention kinds and cross-attention in one line."""

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.errors import AvaConfigError
from Ava.interop import export_hf
from Ava.models import EnhancedMoEModel

CASES = [
    ({"attention": "moh"}, "model.attention=moh"),
    ({"attention": "moa", "num_kv_heads": 1}, "model.attention=moa"),
    ({"cross_attention": {"every": 1}}, "model.cross_attention.every=1"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AvaTokenizer.train(["the king loves the stars and the queen fears the night"] * 20, vocab_size=300,
                              min_frequency=1)


def _folder(tmp_path, tokenizer, dense: bool = False, **overrides):
    moe = {"top_k": 2, "moe_intermediate_size": 32, **({"first_dense_layers": 2} if dense else {})}
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_experts=4,
                      max_seq_len=64, intermediate_size=32, moe=moe, **overrides)
    torch.manual_seed(0)
    folder = EnhancedMoEModel(cfg).save_pretrained(tmp_path / "ava")
    tokenizer.save(folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("overrides, message", CASES)
def test_hf_export_refuses_in_one_line(tmp_path, tokenizer, capsys, overrides, message):
    folder = _folder(tmp_path, tokenizer, **overrides)
    with pytest.raises(AvaConfigError, match=message) as err:
        export_hf(folder, tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("overrides, message", CASES)
def test_gguf_export_refuses_in_one_line(tmp_path, tokenizer, overrides, message, dense):
    pytest.importorskip("gguf")
    from Ava.interop.gguf_export import export_gguf

    folder = _folder(tmp_path, tokenizer, dense=dense, **overrides)
    with pytest.raises(AvaConfigError, match=message) as err:
        export_gguf(folder, tmp_path / "m.gguf")
    text = str(err.value)
    assert text.startswith("cannot export as GGUF: ") and "\n" not in text and text.count(message) == 1
    assert "llama.cpp" in text and not (tmp_path / "m.gguf").exists()

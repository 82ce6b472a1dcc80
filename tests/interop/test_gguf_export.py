"""GGUF export: the file read back with ``gguf``'s reader and dequantized gives Ava's logits (f32 ≤ 1e-4,
q8_0 the same greedy tokens), its metadata and tokenizer are llama.cpp's, and what llama.cpp cannot compute
is refused in one line."""

import numpy as np
import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.errors import AvaConfigError, AvaDataError, AvaOutputError
from Ava.generation import TextGenerator
from Ava.interop import export_gguf, load_gguf, read_gguf_state_dict
from Ava.interop.gguf_export import _permute_rope
from Ava.layers.rotary import RotaryEmbedding, apply_rotary
from Ava.models import EnhancedMoEModel

gguf = pytest.importorskip("gguf")

TEXTS = ["the king loves the stars and the queen fears the night"] * 20 + ["héllo wörld: ünïcode"] * 5
PROMPT = "The king"


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory):
    """The tiny trained run's model saved as an Ava model folder with its tokenizer."""
    trainer, _ = trained_run
    folder = trainer.model.save_pretrained(tmp_path_factory.mktemp("gguf") / "ava")
    trainer.data.tokenizer.save(folder / "tokenizer.json")
    return EnhancedMoEModel.from_pretrained(folder), trainer.data.tokenizer, folder  # the shared model stays as is


@pytest.fixture(scope="module")
def tokenizer():
    return AvaTokenizer.train(TEXTS, vocab_size=300, min_frequency=1)


def _tiny(tmp_path, tokenizer, **overrides) -> tuple[EnhancedMoEModel, object]:
    cfg = dict(vocab_size=tokenizer.vocab_size + 5, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               num_experts=4, max_seq_len=64, intermediate_size=64, rope_theta=10000.0)
    moe = {"top_k": 2, "moe_intermediate_size": 32, **overrides.pop("moe", {})}
    model = EnhancedMoEModel(ModelConfig(**{**cfg, **overrides}, moe=moe)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen) if p.ndim == 1 else torch.randn(p.shape, generator=gen) * 0.1)
    folder = model.save_pretrained(tmp_path / "ava")
    tokenizer.save(folder / "tokenizer.json")
    return model, folder


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def _max_err(a: EnhancedMoEModel, b: EnhancedMoEModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def _field(reader, key):
    return reader.get_field(key).contents()


def test_f32_export_reads_back_with_avas_logits_metadata_and_tokenizer(trained, tmp_path):
    model, tok, folder = trained
    out = export_gguf(folder, tmp_path / "tiny.gguf", quant="f32")
    assert _max_err(model, load_gguf(out), _ids(tok.vocab_size)) <= 1e-4

    reader = gguf.GGUFReader(out)
    cfg = model.config
    expected = {
        "general.architecture": "qwen3moe", "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "qwen3moe.context_length": cfg.max_seq_len, "qwen3moe.embedding_length": cfg.hidden_size,
        "qwen3moe.block_count": cfg.num_layers, "qwen3moe.attention.head_count": cfg.num_heads,
        "qwen3moe.attention.head_count_kv": cfg.num_kv_heads, "qwen3moe.attention.key_length": cfg.head_dim,
        "qwen3moe.expert_count": cfg.num_experts, "qwen3moe.expert_used_count": cfg.moe.top_k,
        "qwen3moe.expert_feed_forward_length": cfg.moe.moe_intermediate_size,
        "qwen3moe.feed_forward_length": cfg.intermediate_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tok.eos_id, "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: _field(reader, key) for key in expected} == expected
    assert _field(reader, "qwen3moe.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(reader, "qwen3moe.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight",
            "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_q_norm.weight"} <= names
    assert not any("mtp" in n or "bias" in n for n in names)

    # the tokens are the tokenizer's vocabulary in id order, the merges its merges, specials are control tokens
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:len(vocab)] == sorted(vocab, key=vocab.get)
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size)]
    import json
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_id] == types[tok.pad_id] == int(gguf.TokenType.CONTROL)
    assert types[tok.encode("the")[0]] == int(gguf.TokenType.NORMAL)


def test_q8_0_export_gives_the_same_greedy_tokens(trained, tmp_path):
    model, tok, folder = trained
    out = export_gguf(folder, tmp_path / "tiny-q8.gguf", quant="q8_0")
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert kinds["blk.1.ffn_gate_exps.weight"] == kinds["blk.0.attn_q.weight"] == Q.Q8_0
    assert kinds["blk.0.ffn_gate_inp.weight"] == kinds["output_norm.weight"] == Q.F32  # as llama.cpp's converter
    prompt = tok.encode(PROMPT)
    ours = TextGenerator(model, tok).generate_ids(prompt, 16, temperature=0, eos_id=None)
    theirs = TextGenerator(load_gguf(out), tok).generate_ids(prompt, 16, temperature=0, eos_id=None)
    assert len(ours) == 16 and ours == theirs


@pytest.mark.parametrize("quant, bound", [("f16", 0.005), ("bf16", 0.1), ("q4_0", 0.6)])
def test_f16_bf16_q4_0_load_with_bounded_logit_error(trained, tmp_path, quant, bound):
    """Mean |Δlogit| on the tiny trained run (logit std ≈ 1.2; measured: f16 5e-4, bf16 4e-3 to 4e-2,
    q4_0 0.2 to 0.25). The mean, not the maximum: a rounding that flips one token's top-k expert
    moves that token's logits by ~2 whatever the format (bf16 does so at one of 32 positions here)."""
    model, tok, folder = trained
    out = export_gguf(folder, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    ids = _ids(tok.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids).logits, load_gguf(out)(ids).logits
    assert torch.isfinite(theirs).all()
    assert (ours - theirs).abs().mean().item() <= bound
    sizes = {"f16": 0.6, "bf16": 0.6, "q4_0": 0.4}  # of the f32 file
    f32 = export_gguf(folder, tmp_path / "ref.gguf")
    assert out.stat().st_size <= sizes[quant] * f32.stat().st_size


@pytest.mark.parametrize("overrides, arch", [
    ({"qk_norm": True, "moe": {"first_dense_layers": 2}}, "qwen3"),  # every layer dense
    ({"qk_norm": False, "moe": {"first_dense_layers": 2}}, "llama"),
    ({"qk_norm": False, "num_experts": 1, "moe": {"top_k": 1}}, "llama"),  # one expert = a dense SwiGLU
    ({"qk_norm": False}, "llama"),  # Mixtral-style MoE
    ({"qk_norm": True, "tie_embeddings": True}, "qwen3moe"),
])
def test_dense_and_llama_exports_read_back_with_avas_logits(tmp_path, tokenizer, overrides, arch):
    model, folder = _tiny(tmp_path, tokenizer, **overrides)
    out = export_gguf(folder, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == arch
    names = {t.name for t in reader.tensors}
    assert ("blk.0.ffn_gate_inp.weight" in names) == (model.config.num_experts > 1 and model.layers[0].is_moe)
    assert ("output.weight" in names) != model.config.tie_embeddings
    cfg, _ = read_gguf_state_dict(out)
    assert _max_err(model, load_gguf(out), _ids(tokenizer.vocab_size)) <= 1e-4, cfg


def test_llama_permutation_turns_rotate_half_into_llama_cpps_interleaved_rope():
    """llama.cpp's ``llama`` rotates pairs (2i, 2i+1); Ava rotates (i, i + d/2). Rotating the permuted
    projection interleaved must give the permuted rotate-half result, so q·k is unchanged."""
    heads, dim, hidden = 2, 8, 16
    weight = torch.randn(heads * dim, hidden, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(5)
    cos, sin = RotaryEmbedding(dim, 16)(pos[None])
    ours = apply_rotary((x @ weight.T).reshape(1, 5, heads, dim), cos, sin)

    q = (x @ _permute_rope(weight, heads).T).reshape(5, heads, dim // 2, 2).double()
    theta = pos[:, None].double() * 10000.0 ** (-torch.arange(0, dim, 2).double() / dim)  # (T, d/2)
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    interleaved = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], dim=-1)
    expected = _permute_rope(ours.reshape(5, heads * dim).T, heads).T  # permute the rows of each head
    assert torch.allclose(interleaved.reshape(5, heads * dim).float(), expected, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"moe": {"first_dense_layers": 1}}, "first_dense_layers=1, moe_every=1: llama.cpp"),
    ({"moe": {"moe_every": 2}}, "moe_every=2"),
    ({"moe": {"norm_topk_prob": False}}, "norm_topk_prob=False"),
    ({"moe": {"router": "switch", "top_k": 1}}, "router=switch"),
    ({"moe": {"num_shared_experts": 1}}, "num_shared_experts"),
    ({"moe": {"router": "sigmoid"}}, "router=sigmoid"),
    ({"qk_norm_scope": "full", "head_dim": 8}, "qk_norm_scope=full"),
    ({"num_experts": 1, "moe": {"top_k": 1, "first_dense_layers": 1}}, "one feed-forward width"),
])
def test_features_llama_cpp_lacks_are_refused_in_one_line(tmp_path, tokenizer, capsys, overrides, message):
    _, folder = _tiny(tmp_path, tokenizer, **overrides)
    with pytest.raises(AvaConfigError, match=message) as err:
        export_gguf(folder, tmp_path / "m.gguf")
    assert str(err.value).startswith("cannot export as GGUF: ") and "\n" not in str(err.value)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: cannot export as GGUF") and message in err_lines[0]


def test_cli_writes_refuses_to_overwrite_and_logs_what_it_wrote(trained, tmp_path, capsys):
    _, _, folder = trained
    out = tmp_path / "model.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "model.gguf.partial").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "as GGUF qwen3moe" in last and "--quant q8_0" in last and str(out) in last and "KiB" in last
    before = out.stat().st_mtime_ns
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: --out {out}: the file exists") and "--force" in line and "\n" not in line
    assert out.stat().st_mtime_ns == before
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--force"]) == 0
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == int(gguf.LlamaFileType.ALL_F32)


@pytest.mark.parametrize("argv, text", [
    (["--format", "gguf", "--dtype", "bf16"], "--dtype and --arch are for --format hf"),
    (["--format", "hf", "--quant", "q8_0"], "--quant q8_0 is for --format gguf"),
])
def test_cli_refuses_options_of_the_other_format(tmp_path, capsys, argv, text):
    out = tmp_path / ("m.gguf" if "gguf" in argv else "hf")
    assert main(["export", str(tmp_path / "missing"), "--out", str(out), *argv]) == 2
    assert text in capsys.readouterr().err


def test_bad_out_is_refused_before_loading(tmp_path, tokenizer, unwritable_dir, monkeypatch, capsys):
    _, folder = _tiny(tmp_path, tokenizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded the checkpoint before checking --out")

    monkeypatch.setattr(EnhancedMoEModel, "from_pretrained", forbidden)
    for out, text in [(unwritable_dir / "m.gguf", "pick"), (tmp_path / "m.bin", "ends in .gguf"),
                      (tmp_path, "is a folder")]:
        assert main(["export", str(folder), "--format", "gguf", "--out", str(out)]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: --out {out}") and text in line and "\n" not in line
    with pytest.raises(AvaOutputError):
        export_gguf(folder, unwritable_dir / "m.gguf")


def test_missing_tokenizer_and_unknown_quant_are_one_line_errors(tmp_path, tokenizer):
    _, folder = _tiny(tmp_path, tokenizer)
    with pytest.raises(AvaConfigError, match="--quant 'q5_k': use one of f32, f16, bf16, q8_0, q4_0"):
        export_gguf(folder, tmp_path / "m.gguf", quant="q5_k")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(AvaDataError, match="has no tokenizer.json") as err:
        export_gguf(folder, tmp_path / "m.gguf")
    assert "\n" not in str(err.value)


def test_progress_bar_over_the_tensors(tmp_path, tokenizer, capsys):
    _, folder = _tiny(tmp_path, tokenizer)
    export_gguf(folder, tmp_path / "m.gguf", progress=True)
    err = capsys.readouterr().err
    assert "export: writing GGUF" in err and "tensor" in err


def test_reader_dequantizes_q4_0_blocks_within_their_step(tmp_path, tokenizer):
    """Each Q4_0 value is within one quantization step (max|block| / 8) of the original."""
    model, folder = _tiny(tmp_path, tokenizer, qk_norm=True)
    out = export_gguf(folder, tmp_path / "m.gguf", quant="q4_0")
    _, state = read_gguf_state_dict(out)
    original = model.state_dict()["layers.0.self_attn.q_proj.weight"]
    blocks = original.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 8
    diff = (state["layers.0.self_attn.q_proj.weight"].reshape(-1, 32) - blocks).abs()
    assert bool((diff <= step + 1e-6).all())
    assert np.isfinite(state["embed_tokens.weight"].numpy()).all()


def test_rows_off_the_block_size_fall_back_to_f16(tmp_path, tokenizer):
    """As llama.cpp's converter: a matrix whose rows are not a multiple of 32 values is written F16."""
    model, folder = _tiny(tmp_path, tokenizer, moe={"moe_intermediate_size": 24})
    out = export_gguf(folder, tmp_path / "m.gguf", quant="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    Q = gguf.GGMLQuantizationType
    assert kinds["blk.0.ffn_down_exps.weight"] == Q.F16 and kinds["blk.0.ffn_gate_exps.weight"] == Q.Q8_0
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - load_gguf(out)(ids).logits).abs().mean().item() <= 0.05


def test_a_failed_write_leaves_no_file(tmp_path, tokenizer, monkeypatch):
    import Ava.interop.gguf_export as module

    _, folder = _tiny(tmp_path, tokenizer)

    def broken(array, qtype):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_encode", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ava"]

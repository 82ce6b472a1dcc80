"""HF export/import: transformers loads Ava's export with equal logits; import → export is lossless."""

import json

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.errors import AvaConfigError
from Ava.interop import export_hf, import_hf
from Ava.interop.huggingface import ava_config_from_hf, read_hf_tensors
from Ava.models import EnhancedMoEModel

transformers = pytest.importorskip("transformers")

TEXTS = ["the king loves the stars and the queen fears the night"] * 20 + ["héllo wörld: ünïcode"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return AvaTokenizer.train(TEXTS, vocab_size=300, min_frequency=1)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm gains around 1
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if name.endswith("gate.weight") else 0.1))


def _ava_checkpoint(tmp_path, tokenizer, **overrides) -> tuple[EnhancedMoEModel, object]:
    cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               num_experts=4, max_seq_len=64, intermediate_size=48, rope_theta=10000.0)
    moe = {"top_k": 2, "moe_intermediate_size": 24, **overrides.pop("moe", {})}
    model = EnhancedMoEModel(ModelConfig(**{**cfg, **overrides}, moe=moe)).eval()
    _randomize(model)
    folder = model.save_pretrained(tmp_path / "ava")
    tokenizer.save(folder / "tokenizer.json")
    return model, folder


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape, arch_class", [
    ({"qk_norm": True, "tie_embeddings": True, "moe": {"first_dense_layers": 1, "norm_topk_prob": False}},
     "Qwen3MoeForCausalLM"),
    ({"qk_norm": False, "moe": {"norm_topk_prob": True}}, "MixtralForCausalLM"),
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer, shape, arch_class):
    model, folder = _ava_checkpoint(tmp_path, tokenizer, **shape)
    out = export_hf(folder, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch_class
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # left-padded batch with an attention mask agrees too
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() <= 1e-4
    # the tokenizer loads through AutoTokenizer and encodes like Ava's
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the queen loves héllo"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id and hf_tok.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("overrides, message", [
    ({"qk_norm": False, "moe": {"num_shared_experts": 1}}, "num_shared_experts"),
    ({"moe": {"router": "sigmoid"}}, "router=sigmoid"),
    ({"qk_norm": False, "moe": {"capacity_factor": 1.0}}, "eval_capacity_factor"),
])
def test_export_refuses_features_no_hf_architecture_has(tmp_path, tokenizer, overrides, message):
    _, folder = _ava_checkpoint(tmp_path, tokenizer, **overrides)
    with pytest.raises(AvaConfigError, match=message):
        export_hf(folder, tmp_path / "hf")


def test_export_as_mixtral_refuses_dense_layers_and_qk_norm(tmp_path, tokenizer, capsys):
    _, folder = _ava_checkpoint(tmp_path, tokenizer, qk_norm=True, moe={"first_dense_layers": 1})
    with pytest.raises(AvaConfigError, match="first_dense_layers=1.*qwen3_moe") as err:
        export_hf(folder, tmp_path / "hf", arch="mixtral")
    assert "qk_norm" in str(err.value) and "\n" not in str(err.value)
    assert main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "x"), "--arch", "mixtral"]) == 2
    assert "first_dense_layers" in capsys.readouterr().err


def _hf_model(kind: str, **extra):
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**base, "head_dim": 8, "intermediate_size": 40,
                                             "moe_intermediate_size": 24, "num_experts": 4, "norm_topk_prob": True,
                                             "mlp_only_layers": [0], **extra})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **{**base, "intermediate_size": 24, "num_local_experts": 4, **extra}))
    else:
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **{**base, "intermediate_size": 24, "num_experts": 4, **extra}))
    _randomize(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("kind, extra", [
    ("qwen3_moe", {}),
    # Qwen3-30B-A3B's shape: head_dim set explicitly, num_heads·head_dim (128) ≠ hidden_size (64)
    ("qwen3_moe", {"hidden_size": 64, "head_dim": 32}),
    ("mixtral", {}),
    ("mixtral", {"head_dim": 16}),
    # OLMoE: one RMSNorm over all 4 query / 2 key heads at once (Ava's qk_norm_scope: full)
    ("olmoe", {}),
])
def test_import_matches_transformers_and_round_trips_losslessly(tmp_path, kind, extra):
    hf = _hf_model(kind, **extra)
    hf.save_pretrained(tmp_path / "hf")  # 5.23 writes the older per-expert naming
    saved = read_hf_tensors(tmp_path / "hf")
    assert any(".experts.0." in k for k in saved)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ava")]) == 0
    model = EnhancedMoEModel.from_pretrained(tmp_path / "ava")
    cfg = model.config
    assert cfg.head_dim == extra.get("head_dim", 8)
    assert cfg.qk_norm == (kind != "mixtral") and cfg.qk_norm_scope == ("full" if kind == "olmoe" else "head")
    ids = _ids(120)
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4
    export_hf(tmp_path / "ava", tmp_path / "back")  # auto picks the source architecture
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["model_type"] == kind and exported["head_dim"] == cfg.head_dim
    assert exported["router_aux_loss_coef"] == pytest.approx(hf.config.router_aux_loss_coef, rel=1e-12)
    again = type(hf).from_pretrained(tmp_path / "back").eval()
    ref = hf.state_dict()
    assert set(again.state_dict()) == set(ref)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
    with torch.no_grad():
        assert (again(ids).logits - ours).abs().max().item() <= 1e-4
    # and Ava → HF → Ava gives back the same tensors
    reimported = import_hf(tmp_path / "back")
    for name, tensor in reimported.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_full_width_qk_norm_exports_only_as_olmoe(tmp_path, tokenizer):
    _, folder = _ava_checkpoint(tmp_path, tokenizer, qk_norm_scope="full")
    with pytest.raises(AvaConfigError, match="qk_norm_scope=full.*--arch olmoe"):
        export_hf(folder, tmp_path / "q", arch="qwen3_moe")
    with pytest.raises(AvaConfigError, match="Mixtral has no QK-norm"):
        export_hf(folder, tmp_path / "m", arch="mixtral")
    _, wide = _ava_checkpoint(tmp_path / "wide", tokenizer, head_dim=16, qk_norm_scope="full")
    with pytest.raises(AvaConfigError, match="model.head_dim=16: OLMoE"):
        export_hf(wide, tmp_path / "o", arch="olmoe")
    _, per_head = _ava_checkpoint(tmp_path / "head", tokenizer)
    with pytest.raises(AvaConfigError, match="qk_norm_scope: full"):
        export_hf(per_head, tmp_path / "h", arch="olmoe")


def test_import_refuses_what_ava_cannot_compute(tmp_path):
    hf = _hf_model("olmoe")
    hf.save_pretrained(tmp_path / "olmoe")
    config = json.loads((tmp_path / "olmoe" / "config.json").read_text())
    (tmp_path / "olmoe" / "config.json").write_text(json.dumps({**config, "clip_qkv": 8.0}))
    with pytest.raises(AvaConfigError, match="clip_qkv=8.0"):
        import_hf(tmp_path / "olmoe")
    (tmp_path / "olmoe" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(AvaConfigError, match="not importable"):
        import_hf(tmp_path / "olmoe")


def test_export_drops_mtp_heads_and_uncertainty_weights(tmp_path, tokenizer, capsys):
    """They are training-only: `ava export` leaves them out, says so, and the logits still match."""
    model, folder = _ava_checkpoint(tmp_path, tokenizer, qk_norm=False, moe={"norm_topk_prob": True},
                                    mtp={"num_heads": 2},
                                    loss={"uncertainty_weighting": ["lm_loss", "load_balance"]})
    assert any(n.startswith("mtp.") for n in model.state_dict())
    out = tmp_path / "hf"
    assert main(["export", str(folder), "--format", "hf", "--out", str(out)]) == 0
    names = set(read_hf_tensors(out))
    assert not any("mtp." in n or "loss_weighting" in n for n in names)
    log = capsys.readouterr().out
    assert "multi-token prediction heads" in log and "uncertainty-weighting" in log
    assert "MixtralForCausalLM" in log
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4



# -- the balancing coefficient ---------------------------------------------------------------
# transformers' load_balancing_loss_func pools the router logits of every MoE layer and divides
# the routed counts by the tokens (not tokens·K): aux = K·E·Σ_i f̄_i·p̄_i, with f_l (share of the
# T·K slots) and p_l (mean probability) of each MoE layer l averaged over the layers. Ava's term is
# aux_loss_coef·E·mean_l Σ_i f_l,i·p_l,i. With router_aux_loss_coef = aux_loss_coef / K the two
# are equal for one MoE layer and differ by aux_loss_coef·E·Σ_i Cov_l(f_l,i, p_l,i) for several.


def _ava_balance(model: EnhancedMoEModel, ids: torch.Tensor):
    """Ava's forward (balancing terms on) and each MoE layer's (f_E, p_E), stacked (L, E)."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for layer in model.layers if layer.is_moe]
    try:
        out = model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    f_LE = torch.stack([r.routed_per_expert_E.float() / r.indices_TK.numel() for r in seen]).detach()
    p_LE = torch.stack([r.probs_TE.mean(dim=0) for r in seen]).detach()
    return out, f_LE, p_LE


def _hf_weighted_aux(hf, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(router_aux_loss_coef · aux_loss, aux_loss) of ``hf`` on ``ids``, as HF adds it to ``loss``."""
    out = hf(ids, labels=ids, output_router_logits=True)
    lm_only = hf(ids, labels=ids).loss
    weighted = hf.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss.detach(), (lm_only + weighted).detach())  # what HF trains on
    return weighted, out.aux_loss


@pytest.mark.parametrize("shape, moe_layers", [
    ({"qk_norm": False, "num_layers": 1}, 1),  # Mixtral
    ({"qk_norm": True, "moe": {"first_dense_layers": 1}}, 1),  # Qwen3-MoE, a dense layer first
    ({"qk_norm": True, "qk_norm_scope": "full", "num_layers": 1, "moe": {"top_k": 3}}, 1),  # OLMoE
    ({"qk_norm": False, "num_layers": 3}, 3),
    ({"qk_norm": True, "num_layers": 3, "moe": {"top_k": 3}}, 3),
])
def test_exported_aux_loss_equals_ava_load_balance_term(tmp_path, tokenizer, caplog, shape, moe_layers):
    shape = {**shape, "moe": {"aux_loss_coef": 0.03, "z_loss_coef": 0.002, "seq_aux_loss_coef": 1e-4,
                              **shape.get("moe", {})}}
    model, folder = _ava_checkpoint(tmp_path, tokenizer, **shape)
    top_k, coef = model.config.moe.top_k, model.config.moe.aux_loss_coef
    with caplog.at_level("INFO", logger="Ava.interop.huggingface"):
        out = export_hf(folder, tmp_path / "hf")
    assert "router_aux_loss_coef = model.moe.aux_loss_coef / top_k" in caplog.text
    assert "z_loss_coef=0.002" in caplog.text and "seq_aux_loss_coef=0.0001" in caplog.text
    assert json.loads((out / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(coef / top_k)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(tokenizer.vocab_size)
    ava, f_LE, p_LE = _ava_balance(model, ids)
    theirs, aux = _hf_weighted_aux(hf, ids)
    assert f_LE.shape[0] == moe_layers
    E = model.config.num_experts
    # HF's pooled loss, from Ava's own routing: K·E·Σ f̄·p̄
    torch.testing.assert_close(aux, top_k * E * (f_LE.mean(0) * p_LE.mean(0)).sum(), rtol=1e-5, atol=0)
    ours = ava.aux_losses["load_balance"]
    if moe_layers == 1:
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)
        # and the same gradient on the router (the term the coefficient weights is the same term)
        name = f"layers.{len(model.layers) - 1}.mlp.gate.weight"
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(hf.get_parameter("model." + name).grad, model.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-8)
    else:  # several layers: they differ by the covariance over layers of f and p
        cov_E = (f_LE * p_LE).mean(0) - f_LE.mean(0) * p_LE.mean(0)
        torch.testing.assert_close(theirs, ours - coef * E * cov_E.sum(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind, extra, moe_layers", [
    ("qwen3_moe", {"router_aux_loss_coef": 0.02}, 1),  # mlp_only_layers [0]: one MoE layer of two
    ("mixtral", {"router_aux_loss_coef": 0.02, "num_hidden_layers": 1}, 1),
    ("olmoe", {"router_aux_loss_coef": 0.02, "num_hidden_layers": 1, "num_experts_per_tok": 3}, 1),
    ("olmoe", {"router_aux_loss_coef": 0.02, "num_hidden_layers": 3}, 3),
])
def test_import_keeps_the_source_balancing_and_adds_no_other_term(tmp_path, caplog, kind, extra, moe_layers):
    hf = _hf_model(kind, **extra)
    hf.save_pretrained(tmp_path / "hf")
    with caplog.at_level("INFO", logger="Ava.interop.huggingface"):
        model = import_hf(tmp_path / "hf")
    assert "router_aux_loss_coef · num_experts_per_tok" in caplog.text
    moe, top_k = model.config.moe, hf.config.num_experts_per_tok
    assert moe.aux_loss_coef == pytest.approx(0.02 * top_k)
    assert (moe.z_loss_coef, moe.seq_aux_loss_coef, moe.global_aux_loss_coef, moe.aux_free_bias) == (0, 0, 0, False)
    assert moe.capacity_factor is None  # dropless, as HF trains
    ids = _ids(120)
    ava, f_LE, p_LE = _ava_balance(model, ids)
    assert set(ava.aux_losses) == {"load_balance"} and f_LE.shape[0] == moe_layers
    theirs, _ = _hf_weighted_aux(hf, ids)
    ours = ava.aux_losses["load_balance"]
    if moe_layers == 1:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    else:
        cov_E = (f_LE * p_LE).mean(0) - f_LE.mean(0) * p_LE.mean(0)
        torch.testing.assert_close(ours, theirs + moe.aux_loss_coef * model.config.num_experts * cov_E.sum(),
                                   rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind, default", [("qwen3_moe", 0.001), ("mixtral", 0.001), ("olmoe", 0.01)])
def test_import_without_router_aux_loss_coef_uses_transformers_default(kind, default):
    """A config.json without the key trains in transformers with its class default; Ava uses it too."""
    hf_cfg = _hf_model(kind).config
    assert type(hf_cfg)().router_aux_loss_coef == default  # transformers' own default
    config = hf_cfg.to_dict()
    config.pop("router_aux_loss_coef")
    cfg = ava_config_from_hf(config)
    assert cfg.moe.aux_loss_coef == pytest.approx(default * config["num_experts_per_tok"])
    assert cfg.moe.z_loss_coef == 0

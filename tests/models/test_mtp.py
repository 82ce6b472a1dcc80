"""Multi-token prediction heads (DeepSeek-V3): targets, loss assembly, gradients, persistence."""

import pytest
import torch
import torch.nn.functional as F

from Ava.config import EnhancedTrainingConfig, ModelConfig, check_compatibility
from Ava.config.feature_compatibility import surgery_terms
from Ava.errors import AvaConfigError
from Ava.models import EnhancedMoEModel

V = 320  # a vocabulary a trained BPE can reach (the training configs below let Ava train one)


def _cfg(num_heads: int = 2, **kw) -> ModelConfig:
    moe = {"top_k": 2, "moe_intermediate_size": 32}
    moe.update(kw.pop("moe", {}))
    base = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                max_seq_len=32, moe=moe, mtp={"num_heads": num_heads, "loss_weight": 0.3})
    base.update(kw)
    return ModelConfig(**base)


def _model(num_heads: int = 2, seed: int = 0, **kw) -> EnhancedMoEModel:
    torch.manual_seed(seed)
    return EnhancedMoEModel(_cfg(num_heads, **kw))


def test_head_j_loss_targets_token_i_plus_j_plus_1():
    # logits path; the fused head gives the same terms (tests/losses/test_fused_head.py)
    model = _model(num_heads=3, loss={"fused_head": "off"})
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, labels=ids)
    B, T = ids.shape
    assert len(out.mtp_logits) == 3 and all(lg.shape == (B, T, V) for lg in out.mtp_logits)
    manual = []
    for j, logits_BTV in enumerate(out.mtp_logits, start=1):
        # position i predicts token i + j + 1, so positions 0..T-j-2 have a target
        manual.append(F.cross_entropy(logits_BTV[:, : T - j - 1].reshape(-1, V), ids[:, j + 1:].reshape(-1)))
    expected = 0.3 / 3 * torch.stack(manual).sum()
    torch.testing.assert_close(out.aux_losses["mtp"], expected, rtol=1e-6, atol=1e-6)
    # A wrong shift gives a different value (so the check above pins the alignment).
    wrong = F.cross_entropy(out.mtp_logits[0][:, : T - 1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert not torch.allclose(wrong, manual[0])


def test_head_j_sees_tokens_up_to_i_plus_j_and_nothing_later():
    model = _model(num_heads=2).eval()
    ids = torch.randint(0, V, (1, 10))
    base = model(ids, return_mtp=True).mtp_logits
    i = 3
    for j, logits_BTV in enumerate(base, start=1):
        later = ids.clone()
        later[0, i + j + 1] = (later[0, i + j + 1] + 1) % V  # the target token itself
        moved = model(later, return_mtp=True).mtp_logits[j - 1]
        # depth j at position p sees tokens ≤ p + j: positions ≤ i never see token i + j + 1
        torch.testing.assert_close(moved[0, : i + 1], logits_BTV[0, : i + 1])
        fed = ids.clone()
        fed[0, i + j] = (fed[0, i + j] + 1) % V  # the token embedded at depth j for position i
        changed = model(fed, return_mtp=True).mtp_logits[j - 1]
        assert not torch.allclose(changed[0, i], logits_BTV[0, i])
        torch.testing.assert_close(changed[0, :i], logits_BTV[0, :i])


def test_total_loss_is_lm_plus_every_aux_term_including_mtp():
    model = _model(num_heads=2)
    ids = torch.randint(0, V, (2, 10))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balance", "z_loss", "mtp"}
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    # the MTP blocks are MoE (the placement rule continues the stack): their routing is reported
    assert [s.layer for s in out.router_stats] == [0, 1, 2, 3]
    assert surgery_terms(EnhancedTrainingConfig(model=_cfg(2))) == ["lm_loss", "load_balance", "z_loss", "mtp"]


def test_dense_mtp_block_follows_the_placement_rule():
    model = _model(num_heads=1, moe={"moe_every": 2})  # layer 1 MoE, MTP block = layer 2 -> dense
    assert not model.mtp[0].block.is_moe and model.mtp[0].block.layer_idx == 2
    ids = torch.randint(0, V, (1, 8))
    assert [s.layer for s in model(ids, labels=ids).router_stats] == [1]


def test_gradient_reaches_mtp_modules_and_the_shared_head_and_embedding():
    model = _model(num_heads=2, tie_embeddings=False)
    ids = torch.randint(0, V, (2, 10))
    model(ids, labels=ids).aux_losses["mtp"].backward()
    names = {n for n, _ in model.named_parameters()}
    for name in ("mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight", "mtp.1.eh_proj.weight",
                 "mtp.1.block.self_attn.q_proj.weight", "mtp.1.block.mlp.experts.gate_up_proj", "mtp.1.norm.weight"):
        assert name in names
    params = dict(model.named_parameters())
    for name in ("mtp.0.eh_proj.weight", "mtp.1.eh_proj.weight", "mtp.0.block.self_attn.q_proj.weight",
                 "mtp.0.block.mlp.experts.gate_up_proj", "mtp.1.norm.weight", "lm_head.weight",
                 "embed_tokens.weight", "layers.0.self_attn.q_proj.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # the final norm of the main stack is not on the MTP path (h^0 is taken before it)
    assert params["norm.weight"].grad is None


def test_num_heads_zero_leaves_the_model_exactly_as_before():
    plain = _model(num_heads=0)
    without_key = {k: v for k, v in _cfg(0).model_dump().items() if k not in ("mtp", "loss")}
    torch.manual_seed(0)
    reference = EnhancedMoEModel(ModelConfig(**without_key))
    assert list(plain.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value)
    assert plain.mtp is None and not any(k.startswith("mtp") for k in plain.state_dict())
    ids = torch.randint(0, V, (2, 9))
    out0 = plain(ids, labels=ids, return_mtp=True)
    assert out0.mtp_logits is None and "mtp" not in out0.aux_losses
    # Heads are built after the main stack: same seed, same main weights, same main outputs.
    with_heads = _model(num_heads=2)
    out2 = with_heads(ids, labels=ids, return_mtp=True)  # return_mtp: logits are materialised
    torch.testing.assert_close(out2.logits, out0.logits)
    torch.testing.assert_close(out2.lm_loss, out0.lm_loss)


def test_kv_cache_path_is_unchanged_and_refuses_mtp_with_a_cache():
    model = _model(num_heads=1).eval()
    ids = torch.randint(0, V, (1, 6))
    out = model(ids, use_cache=True)
    assert out.mtp_logits is None and out.past_key_values is not None
    step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    full = model(torch.cat([ids, ids[:, -1:]], dim=1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids[:, -1:], labels=ids[:, -1:], past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids[:, -1:], past_key_values=out.past_key_values, return_mtp=True)


def test_main_logits_stay_causal_with_mtp_on():
    model = _model(num_heads=2).eval()
    ids = torch.randint(0, V, (1, 10))
    base = model(ids, labels=ids).logits
    changed_ids = ids.clone()
    changed_ids[0, 6] = (changed_ids[0, 6] + 1) % V
    changed = model(changed_ids, labels=changed_ids).logits
    torch.testing.assert_close(changed[0, :6], base[0, :6])
    assert not torch.allclose(changed[0, 6], base[0, 6])


def test_save_load_round_trip_keeps_mtp_weights(tmp_path):
    model = _model(num_heads=2)
    with torch.no_grad():
        model.mtp[1].eh_proj.weight.add_(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = EnhancedMoEModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.mtp.num_heads == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    ids = torch.randint(0, V, (1, 8))
    model.eval()
    for a, b in zip(model(ids, return_mtp=True).mtp_logits, loaded(ids, return_mtp=True).mtp_logits):
        torch.testing.assert_close(a, b)


def test_accounting_includes_the_mtp_modules():
    plain, heads = _model(num_heads=0), _model(num_heads=2)
    mtp_params = sum(p.numel() for p in heads.mtp.parameters())
    assert heads.num_parameters() == plain.num_parameters() + mtp_params
    cfg = heads.config
    per_expert = 2 * cfg.moe.moe_intermediate_size * cfg.hidden_size + cfg.hidden_size * cfg.moe.moe_intermediate_size
    inactive = (cfg.num_experts - cfg.moe.top_k) * per_expert
    assert heads.num_parameters(active_only=True) == plain.num_parameters(active_only=True) + mtp_params - 2 * inactive
    # per depth: eh_proj (2d·d) + one more head pass (d·V) + a layer's matmuls and attention term
    T, d = 16, cfg.hidden_size
    layer_flops = (plain.flops_per_token(T) - 6.0 * d * V) / cfg.num_layers
    expected = plain.flops_per_token(T) + 2 * (6.0 * (2 * d * d + d * V) + layer_flops)
    assert heads.flops_per_token(T) == pytest.approx(expected)


def test_aux_free_bias_updates_the_mtp_blocks_too():
    model = _model(num_heads=1, moe={"aux_free_bias": True, "bias_update_rate": 0.1})
    ids = torch.randint(0, V, (2, 8))
    stats = model(ids, labels=ids).router_stats
    model.update_expert_bias([s.tokens_per_expert for s in stats])
    assert model.mtp[0].block.mlp.gate.expert_bias.abs().sum() > 0


def test_adamw_steps_lower_the_mtp_loss():
    model = _model(num_heads=2, seed=1)
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        out = model(ids, labels=ids)
        losses.append(out.aux_losses["mtp"].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_rules_for_mtp():
    with pytest.raises(AvaConfigError, match="model.mtp.num_heads"):
        EnhancedMoEModel(_cfg(num_heads=31))  # max_seq_len 32: head 31 would have no target
    config = EnhancedTrainingConfig.from_dict({"model": {**_cfg(4).model_dump(), "max_seq_len": 64},
                                               "data": {"seq_len": 5}})
    assert [str(i) for i in check_compatibility(config)] == [
        "model.mtp.num_heads: 4 heads need training sequences longer than num_heads + 1 but data.seq_len=5; "
        "lower num_heads or raise data.seq_len"
    ]
    assert not check_compatibility(EnhancedTrainingConfig(model=_cfg(3), data={"seq_len": 5}))
    zero = EnhancedTrainingConfig(model=_cfg(1, mtp={"num_heads": 1, "loss_weight": 0.0}))
    assert [(i.key, i.severity) for i in check_compatibility(zero)] == [("model.mtp.loss_weight", "warning")]


def _trainer(model_extra: dict, gradient: dict | None = None):
    from Ava.training import EnhancedModularTrainer

    data = {"model": {"vocab_size": V, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_experts": 4,
                      "max_seq_len": 16, "moe": {"top_k": 2, "moe_intermediate_size": 32, "aux_free_bias": True},
                      **model_extra},
            "training": {"batch_size": 2}, "gradient": gradient or {}, "run": {"device": "cpu"}}
    config = EnhancedTrainingConfig.model_validate(data)
    assert not [i for i in check_compatibility(config) if i.severity == "error"]
    torch.manual_seed(0)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    return trainer


def test_trainer_logs_mtp_and_uncertainty_terms_and_updates_mtp_expert_bias():
    trainer = _trainer({"mtp": {"num_heads": 1}, "loss": {"uncertainty_weighting": ["lm_loss", "mtp"]}})
    g = torch.Generator().manual_seed(1)
    metrics = trainer.train_step([torch.randint(0, V, (2, 16), generator=g) for _ in range(2)])  # 2 micro-batches
    for key in ("loss", "lm_loss", "load_balance", "z_loss", "mtp", "uncertainty", "moe/l2/max_vio"):
        assert key in metrics, key
    parts = metrics["lm_loss"] + sum(metrics[k] for k in ("load_balance", "z_loss", "mtp", "uncertainty"))
    torch.testing.assert_close(metrics["loss"], parts)
    assert trainer.model.mtp[0].block.mlp.gate.expert_bias.abs().sum() > 0
    assert trainer.model.loss_weighting.log_vars.abs().min() > 0  # trained by the step


def test_gradient_surgery_accepts_the_mtp_term():
    trainer = _trainer({"mtp": {"num_heads": 1}}, {"surgery": {"method": "pcgrad", "terms": ["lm_loss", "mtp"]}})
    metrics = trainer.train_step([torch.randint(0, V, (2, 16))])
    assert metrics["skipped"] == 0.0 and "mtp" in metrics

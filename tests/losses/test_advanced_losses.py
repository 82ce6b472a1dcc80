"""Label smoothing, focal, chunked cross-entropy, uncertainty weighting and the assembled total."""

import math

import pytest
import torch
import torch.nn.functional as F

from Ava.config import EnhancedTrainingConfig, LossConfig, ModelConfig, check_compatibility
from Ava.errors import AvaConfigError
from Ava.losses import (
    UncertaintyWeighting,
    assemble_losses,
    causal_lm_loss,
    causal_lm_objective,
    focal_losses,
    total_loss,
)
from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer

V = 37


def _logits_labels(seed: int = 0, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float32) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2:5] = -100
    labels[2, -3:] = -100
    return logits, labels


def _value_and_grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_ce_equals_plain_ce_in_value_and_gradient(chunk_size, smoothing):
    logits, labels = _logits_labels()
    plain_v, plain_g = _value_and_grad(lambda x: causal_lm_loss(x, labels, label_smoothing=smoothing), logits)
    cfg = LossConfig(chunk_size=chunk_size, label_smoothing=smoothing)
    chunk_v, chunk_g = _value_and_grad(lambda x: causal_lm_objective(x, labels, cfg), logits)
    torch.testing.assert_close(chunk_v, plain_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunk_g, plain_g, rtol=0, atol=1e-6)
    # the grad on the last position (never predicts anything) and ignored targets is exactly 0
    assert chunk_g[:, -1].abs().max() == 0 and chunk_g[0, 1:4].abs().max() == 0


def test_chunked_ce_keeps_no_fp32_logits_alive_for_backward():
    B, T, vocab = 2, 64, 1000
    logits = torch.randn(B, T, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (B, T))

    def saved_bytes(fn) -> int:
        """Bytes autograd keeps from forward to backward, beyond the logits' own storage."""
        total = 0

        def pack(t):
            nonlocal total
            if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        return total

    full_fp32 = B * (T - 1) * vocab * 4
    assert saved_bytes(lambda: causal_lm_loss(logits, labels)) >= full_fp32  # plain keeps log-probs
    for smoothing in (0.0, 0.1):
        cfg = LossConfig(chunk_size=8, label_smoothing=smoothing)
        # per-row numbers only (a few bytes per position), not the B·T·V fp32 log-probs
        assert saved_bytes(lambda: causal_lm_objective(logits, labels, cfg)) < 16 * B * T


def test_chunked_ce_under_no_grad_and_bf16_logits_keep_their_dtype():
    logits, labels = _logits_labels(1)
    with torch.no_grad():
        v = causal_lm_objective(logits, labels, LossConfig(chunk_size=2))
    torch.testing.assert_close(v, causal_lm_loss(logits, labels), rtol=0, atol=1e-6)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    loss = causal_lm_objective(x, labels, LossConfig(chunk_size=4))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, causal_lm_loss(x.detach(), labels), rtol=0, atol=1e-6)


def test_default_objective_is_the_plain_causal_lm_loss():
    logits, labels = _logits_labels(2)
    torch.testing.assert_close(causal_lm_objective(logits, labels), causal_lm_loss(logits, labels), rtol=0, atol=0)
    all_ignored = torch.full_like(labels, -100)
    assert causal_lm_objective(logits, all_ignored, LossConfig(chunk_size=3)).item() == 0.0


def test_focal_with_gamma_zero_is_cross_entropy_and_gamma_two_by_hand():
    logits, labels = _logits_labels(3)
    cfg0 = LossConfig(focal_gamma=0.0)
    torch.testing.assert_close(causal_lm_objective(logits, labels, cfg0), causal_lm_loss(logits, labels))
    # γ = 0 through the focal code path itself (not the CE shortcut)
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    ce_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(focal_losses(flat_logits, flat_labels, 0.0).sum(), ce_sum)
    # by hand on two rows: p_true 0.5 and 0.9 (two-class logits)
    two = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]])
    target = torch.tensor([0, 0])
    expected = (0.5 ** 2) * math.log(2.0) + (0.1 ** 2) * -math.log(0.9)
    assert focal_losses(two, target, 2.0).sum().item() == pytest.approx(expected, rel=1e-6)
    # chunked focal equals unchunked focal, value and gradient
    plain = _value_and_grad(lambda x: causal_lm_objective(x, labels, LossConfig(focal_gamma=2.0)), logits)
    chunked = _value_and_grad(lambda x: causal_lm_objective(x, labels, LossConfig(focal_gamma=2.0, chunk_size=3)),
                              logits)
    torch.testing.assert_close(chunked[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[1], plain[1], rtol=0, atol=1e-6)
    assert plain[0] < causal_lm_loss(logits, labels)  # focal down-weights every token
    # γ < 1 where p_t rounds to 1 (1 − p_t = 0, d/dx x^γ infinite) must not turn the gradient into NaN
    certain = logits.clone()
    certain[1, 3, labels[1, 4]] = 200.0
    _, grad = _value_and_grad(lambda x: causal_lm_objective(x, labels, LossConfig(focal_gamma=0.5)), certain)
    assert torch.isfinite(grad).all()


def test_uncertainty_weighting_by_hand_and_its_parameters_train():
    weighting = UncertaintyWeighting(["lm_loss", "mtp"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -1.0]))
    lm, mtp = torch.tensor(2.0), torch.tensor(0.4)
    correction = weighting({"lm_loss": lm, "mtp": mtp, "z_loss": torch.tensor(9.0)})
    weighted = math.exp(-0.5) * 2.0 + 0.25 + math.exp(1.0) * 0.4 - 0.5
    # total = lm + mtp + correction = Σ exp(-s)·L + s/2 over the weighted terms
    assert (lm + mtp + correction).item() == pytest.approx(weighted, rel=1e-6)
    weights = weighting.weights()
    assert weights["mtp"].item() == pytest.approx(math.e, rel=1e-6)

    fresh = UncertaintyWeighting(["a", "b"])
    assert fresh({"a": torch.tensor(3.0), "b": torch.tensor(1.0)}).item() == 0.0  # starts unweighted
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    for _ in range(20):
        total = total_loss(torch.tensor(0.0), {"a": torch.tensor(3.0), "b": torch.tensor(0.1)})
        total = total + fresh({"a": torch.tensor(3.0), "b": torch.tensor(0.1)})
        opt.zero_grad()
        total.backward()
        opt.step()
    s_a, s_b = fresh.log_vars.tolist()
    # optimum s = log(2L): the big term gets a larger variance (smaller weight), the small one smaller
    assert s_a > 0.5 and s_b < -0.5
    with pytest.raises(KeyError, match="missing|not produced"):
        fresh({"a": torch.tensor(1.0)})


def _model_cfg(vocab_size: int = V, **loss) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                       max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32},
                       mtp={"num_heads": 1}, loss=loss)


def test_model_uses_the_configured_objective_and_registers_uncertainty_weights(tmp_path):
    torch.manual_seed(0)
    model = EnhancedMoEModel(_model_cfg(label_smoothing=0.1, chunk_size=4, uncertainty_weighting=["lm_loss", "mtp"]))
    ids = torch.randint(0, V, (2, 10))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.lm_loss, causal_lm_loss(out.logits, ids, label_smoothing=0.1), rtol=0, atol=1e-6)
    assert list(out.aux_losses) == ["load_balance", "z_loss", "mtp", "uncertainty"]
    assert out.aux_losses["uncertainty"].item() == 0.0  # s = 0 at init
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    assert "loss_weighting.log_vars" in dict(model.named_parameters())
    opt = build_optimizer(model, EnhancedTrainingConfig(model=model.config).optimizer, 1e-2, torch.device("cpu"))
    assert any(p is model.loss_weighting.log_vars for g in opt.param_groups for p in g["params"])
    for _ in range(3):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert model.loss_weighting.log_vars.abs().min() > 0
    model.save_pretrained(tmp_path / "m")
    loaded = EnhancedMoEModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.loss_weighting.log_vars, model.loss_weighting.log_vars)


def test_assemble_losses_keeps_balance_terms_and_adds_mtp():
    logits, labels = _logits_labels(4)
    balance = {"load_balance": torch.tensor(0.02)}
    terms = assemble_losses(logits, labels, balance, [logits, logits], mtp_weight=0.5)
    assert list(terms.aux_losses) == ["load_balance", "mtp"] and len(terms.mtp_head_losses) == 2
    torch.testing.assert_close(terms.aux_losses["mtp"], 0.5 / 2 * sum(terms.mtp_head_losses))
    torch.testing.assert_close(terms.loss, terms.lm_loss + 0.02 + terms.aux_losses["mtp"])


def test_loss_config_rules():
    # training configs get a vocabulary a trained BPE can reach (≥ 260), so only the loss rules speak
    cfg = EnhancedTrainingConfig(model=_model_cfg(320, focal_gamma=2.0, label_smoothing=0.1,
                                                  uncertainty_weighting=["lm_loss", "load_balance", "nope"]))
    keys = sorted(i.key for i in check_compatibility(cfg) if i.severity == "error")
    assert keys == ["model.loss.focal_gamma", "model.loss.uncertainty_weighting"]
    with pytest.raises(AvaConfigError, match="chunk_size"):
        EnhancedTrainingConfig.from_dict({"model": {"loss": {"chunk_size": 0}}})
    warn = EnhancedTrainingConfig(model=_model_cfg(320, chunk_size=64), data={"seq_len": 16})
    assert [(i.key, i.severity) for i in check_compatibility(warn)] == [("model.loss.chunk_size", "warning")]
    ok = EnhancedTrainingConfig(model=_model_cfg(320, uncertainty_weighting=["lm_loss", "mtp", "z_loss"]))
    assert not check_compatibility(ok)

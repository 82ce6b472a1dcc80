"""The fused output head + cross-entropy equals the logits path in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from Ava.config import LossConfig, ModelConfig
from Ava.config.feature_compatibility import model_issues
from Ava.losses import causal_lm_objective, fused_causal_lm_objective, fused_linear_cross_entropy_sum, use_fused_head
from Ava.losses import fused_head as fused_module
from Ava.models import EnhancedMoEModel


def _inputs(N=300, D=16, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100  # ignored rows
    return h, w, y


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows", [64, 1000])  # several chunks with a remainder, and one chunk
def test_value_and_gradients_match_cross_entropy_fp32(monkeypatch, smoothing, rows):
    monkeypatch.setattr(fused_module, "chunk_rows", lambda vocab, device: rows)
    h, w, y = _inputs()
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum", label_smoothing=smoothing)
    ref.mul(0.37).backward()  # a non-unit upstream gradient
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = fused_linear_cross_entropy_sum(h, w, y, smoothing)
    got.mul(0.37).backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-5)
    assert h.grad[::7].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_with_underflowing_probability(smoothing):
    """Rows whose target probability underflows fp32 (log p_y ≈ −700) still get the exact loss."""
    h, w, y = _inputs(N=40, D=16, V=97)
    with torch.no_grad():
        w.mul_(60.0)  # logits spread over hundreds of nats: most targets have p_y ≈ 0 in fp32
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum", label_smoothing=smoothing)
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = fused_linear_cross_entropy_sum(h, w, y, smoothing)
    got.backward()
    p_true = torch.softmax(h @ w.t(), -1).gather(1, y.clamp(min=0)[:, None])
    assert (p_true < 1e-30).sum() > 5  # the case under test happens
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("host_sync", [True, False], ids=["cpu", "accelerator"])
def test_log_sum_exp_from_the_softmax_both_paths(dtype, host_sync):
    """The CPU path (host check) and the accelerator path (no sync) both give each row's
    log-sum-exp, also where the target's probability underflows fp32."""
    g = torch.Generator().manual_seed(0)
    z_ZV = (torch.randn(64, 211, generator=g) * torch.linspace(1, 200, 64)[:, None]).to(dtype)
    y_Z = torch.randint(0, 211, (64,), generator=g)
    p_ZV = torch.softmax(z_ZV, dim=-1, dtype=torch.float32)
    p_true_Z = p_ZV[torch.arange(64), y_Z]
    z_true_Z = z_ZV.gather(1, y_Z[:, None]).squeeze(1).float()
    assert (p_true_Z < 1e-30).sum() > 10  # the fallback rows exist
    got = fused_module._log_sum_exp(z_ZV, p_ZV, p_true_Z, z_true_Z, host_sync)
    torch.testing.assert_close(got, torch.logsumexp(z_ZV.float(), dim=-1), rtol=1e-6, atol=1e-4)


def test_bf16_autocast_matches_the_autocast_logits_path():
    h, w, y = _inputs(N=256, D=32, V=211)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy_sum(h, w, y)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # Both round the logits to bf16 (8 bits of mantissa): agree to bf16 precision.
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=0)
    torch.testing.assert_close(h.grad, ref_gh, rtol=0, atol=2e-2 * ref_gh.abs().max().item())
    torch.testing.assert_close(w.grad, ref_gw, rtol=0, atol=2e-2 * ref_gw.abs().max().item())


def test_no_grad_and_frozen_inputs():
    h, w, y = _inputs()
    with torch.no_grad():
        value = fused_linear_cross_entropy_sum(h, w, y)
    torch.testing.assert_close(value, F.cross_entropy(h @ w.t(), y, reduction="sum"), rtol=1e-5, atol=1e-5)
    frozen_w = w.detach()
    fused_linear_cross_entropy_sum(h, frozen_w, y).backward()
    assert h.grad is not None and frozen_w.grad is None


def test_causal_objective_equals_the_logits_objective():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 9, 16, generator=g)
    w = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[1, :4] = -100
    cfg = LossConfig(label_smoothing=0.05)
    torch.testing.assert_close(fused_causal_lm_objective(h, w, labels, cfg),
                               causal_lm_objective(h @ w.t(), labels, cfg), rtol=1e-5, atol=1e-6)
    all_ignored = torch.full_like(labels, -100)
    assert fused_causal_lm_objective(h, w, all_ignored).item() == 0.0
    with pytest.raises(ValueError, match="focal"):
        fused_causal_lm_objective(h, w, labels, LossConfig(focal_gamma=2.0))


def test_yaml_bare_on_off_are_the_words():
    import yaml

    for text, value in (("on", "on"), ("off", "off"), ("auto", "auto")):
        loss = yaml.safe_load(f"fused_head: {text}")  # YAML 1.1: bare on/off are booleans
        assert LossConfig(**loss).fused_head == value


def test_auto_rule_and_config_errors():
    assert use_fused_head(LossConfig())
    assert not use_fused_head(LossConfig(focal_gamma=1.0))
    assert not use_fused_head(LossConfig(chunk_size=8))
    assert not use_fused_head(LossConfig(fused_head="off"))
    m = ModelConfig(loss={"fused_head": "on", "focal_gamma": 1.0})
    errors = [i for i in model_issues(m) if i.key == "model.loss.fused_head"]
    assert errors and "focal_gamma" in errors[0].message


@pytest.mark.parametrize("tied", [False, True])
def test_model_training_step_is_the_same_with_and_without_fusion(tied):
    """Loss, every term and every parameter gradient (MTP heads, tied embeddings) agree."""
    results = []
    for mode in ("off", "on"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                          max_seq_len=32, tie_embeddings=tied, moe={"top_k": 2, "moe_intermediate_size": 32},
                          mtp={"num_heads": 2, "loss_weight": 0.3}, loss={"fused_head": mode, "label_smoothing": 0.1})
        model = EnhancedMoEModel(cfg)
        ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
        labels = ids.clone()
        labels[0, :5] = -100
        out = model(ids, labels=labels)
        assert (out.logits is None) == (mode == "on") and (out.mtp_logits is None) == (mode == "on")
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (off, g_off), (on, g_on) = results
    torch.testing.assert_close(on.loss, off.loss, rtol=1e-5, atol=1e-6)
    assert on.aux_losses.keys() == off.aux_losses.keys()
    for name in off.aux_losses:
        torch.testing.assert_close(on.aux_losses[name], off.aux_losses[name], rtol=1e-5, atol=1e-6)
    assert g_on.keys() == g_off.keys()
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fp16_autocast_keeps_gradients_in_fp32():
    """With fp16 the gradient products run in fp32: here dW[y] = Σ_rows (p_y − 1)·h ≈ −256·500,
    past fp16's 65504, which would be inf before any loss scaling could help."""
    h = torch.full((256, 32), 500.0, requires_grad=True)
    w = (torch.randn(97, 32, generator=torch.Generator().manual_seed(0)) * 1e-4).requires_grad_()
    y = torch.full((256,), 5)
    with torch.autocast("cpu", dtype=torch.float16):
        got = fused_linear_cross_entropy_sum(h, w, y)
    got.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
    ref_w = w.detach().clone().requires_grad_()
    F.cross_entropy(h.detach() @ ref_w.t(), y, reduction="sum").backward()
    assert ref_w.grad.abs().max() > 65504
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-2, atol=1.0)

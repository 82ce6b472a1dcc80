"""EnhancedMoEModel: losses, backends, persistence, accounting, training signal."""

import math
import os

import pytest
import torch

from Ava.config import ModelConfig
from Ava.errors import AvaCheckpointError
from Ava.models import EnhancedMoEModel, MoEModelOutput


def _cfg(**kw) -> ModelConfig:
    moe = {"top_k": 2, "moe_intermediate_size": 32}
    moe.update(kw.pop("moe", {}))
    base = dict(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                num_experts=4, max_seq_len=32, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int = 0, **kw) -> EnhancedMoEModel:
    torch.manual_seed(seed)
    return EnhancedMoEModel(_cfg(**kw))


def test_output_fields_and_total_loss():
    model = _model()
    ids = torch.randint(0, 53, (2, 10))
    out = model(ids, labels=ids)
    assert isinstance(out, MoEModelOutput)
    assert out.logits is None  # training forward: the fused head never makes the logits
    assert model.eval()(ids, labels=ids).logits.shape == (2, 10, 53)
    model.train()
    assert out.lm_loss.dtype == torch.float32
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    assert [s.layer for s in out.router_stats] == [0, 1]
    for s in out.router_stats:
        assert s.tokens_per_expert.shape == (4,) and s.tokens_per_expert.sum() == 2 * 10 * 2
        assert not s.aux_loss.requires_grad and not s.z_loss.requires_grad
    alpha, beta = model.config.moe.aux_loss_coef, model.config.moe.z_loss_coef
    mean_aux = torch.stack([s.aux_loss for s in out.router_stats]).mean()
    mean_z = torch.stack([s.z_loss for s in out.router_stats]).mean()
    torch.testing.assert_close(out.aux_losses["load_balance"].detach(), alpha * mean_aux)
    torch.testing.assert_close(out.aux_losses["z_loss"].detach(), beta * mean_z)
    assert out.past_key_values is None
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.lm_loss is None


def test_zero_coefficients_and_dense_layers_omit_terms():
    model = _model(moe={"z_loss_coef": 0.0, "first_dense_layers": 1})
    ids = torch.randint(0, 53, (1, 6))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balance"}
    assert [s.layer for s in out.router_stats] == [1]
    dense = _model(moe={"first_dense_layers": 2})
    out = dense(ids, labels=ids)
    assert out.aux_losses == {} and out.router_stats == []
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_ignored_labels_do_not_count():
    model = _model()
    ids = torch.randint(0, 53, (2, 8))
    labels = ids.clone()
    labels[0, 3:] = -100
    out = model(ids, labels=labels)  # fused head (training forward)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].reshape(-1, 53)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.lm_loss, expected)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_model_backends_agree_forward_and_backward(top_k):
    results = []
    for backend in ("loop", "grouped"):
        model = _model(moe={"top_k": top_k, "backend": backend}, loss={"fused_head": "off"})  # logits compared
        ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(5))
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_bf16_autocast_forward_backward(backend):
    model = _model(moe={"backend": backend})
    ids = torch.randint(0, 53, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.lm_loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_adamw_on_a_repeated_batch_drives_loss_down():
    model = _model()
    ids = torch.randint(0, 53, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    model = _model(tie_embeddings=tied).eval()
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 53, (2, 9))
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = EnhancedMoEModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if tied:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        assert loaded.num_parameters() == model.num_parameters()


def test_load_from_run_folder_latest_symlink(tmp_path):
    model = _model().eval()
    model.save_pretrained(tmp_path / "run" / "checkpoints" / "step_10")
    os.symlink("step_10", tmp_path / "run" / "checkpoints" / "latest")
    loaded = EnhancedMoEModel.from_pretrained(tmp_path / "run")
    ids = torch.randint(0, 53, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_missing_or_broken_checkpoint_raises_ava_error(tmp_path):
    with pytest.raises(AvaCheckpointError, match="no checkpoint at .*model.safetensors"):
        EnhancedMoEModel.from_pretrained(tmp_path / "nope")
    _model().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AvaCheckpointError, match="cannot load weights"):
        EnhancedMoEModel.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text("training: {}\n")
    with pytest.raises(AvaCheckpointError, match="model"):
        EnhancedMoEModel.from_pretrained(tmp_path / "ckpt")


def test_parameter_and_flop_accounting():
    model = _model()
    cfg = model.config
    D, V, E, inter, L, k = 32, 53, 4, 32, 2, 2  # inter: the experts' I
    attn = D * D + 2 * D * 16 + D * D  # q, k, v (2 kv heads of 8), o
    expert = 3 * D * inter
    norms = 2 * D + 2 * 8  # input/post norms + q/k norms
    per_layer = attn + E * D + E * expert + norms
    total = V * D + L * per_layer + D + V * D
    assert model.num_parameters() == total
    assert model.num_parameters(active_only=True) == total - L * (E - k) * expert
    n_active = L * (attn + E * D + k * expert) + V * D
    assert model.flops_per_token(16) == 6 * n_active + 6 * L * 16 * D
    assert cfg.num_heads * cfg.head_dim == D


def test_output_projections_get_depth_scaled_init():
    model = _model(num_layers=8, hidden_size=64, moe={"moe_intermediate_size": 128})
    std = model.config.initializer_range
    scaled = std / math.sqrt(2 * 8)
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.layers[0].self_attn.o_proj.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(model.layers[0].mlp.experts.down_proj.std().item() - scaled) < 0.1 * scaled
    assert abs(model.layers[0].mlp.experts.gate_up_proj.std().item() - std) < 0.1 * std

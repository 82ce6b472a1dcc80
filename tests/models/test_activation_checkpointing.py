"""Activation checkpointing: same losses, router statistics and gradients, fewer saved activations."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.models import EnhancedMoEModel


def _cfg(**kw) -> ModelConfig:
    moe = {"top_k": 2, "moe_intermediate_size": 32, "seq_aux_loss_coef": 0.01}
    moe.update(kw.pop("moe", {}))
    base = dict(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                num_experts=4, max_seq_len=32, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def _step(model: EnhancedMoEModel, ids: torch.Tensor, checkpointing: bool, seed: int = 7):
    """One training forward + backward; the RNG is reseeded so dropout/noise draw alike."""
    model.set_activation_checkpointing(checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


CONFIGS = {
    "aux_and_z_loss": {},
    "mtp_heads": {"mtp": {"num_heads": 2}},
    "noisy_topk_and_dropout": {"dropout": 0.1, "moe": {"router": "noisy_topk"}},
    "dense_first_layer_and_capacity": {"moe": {"first_dense_layers": 1, "capacity_factor": 1.0}},
    "shared_expert_aux_free_bias": {"moe": {"num_shared_experts": 1, "aux_free_bias": True}},
}


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_checkpointing_gives_the_same_losses_stats_and_gradients(overrides):
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(**overrides))
    ids = torch.randint(0, 53, (3, 16), generator=torch.Generator().manual_seed(1))
    plain, plain_grads = _step(model, ids, checkpointing=False)
    ckpt, ckpt_grads = _step(model, ids, checkpointing=True)

    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=1e-6)
    assert set(ckpt.aux_losses) == set(plain.aux_losses) and "load_balance" in plain.aux_losses
    for name, value in plain.aux_losses.items():
        torch.testing.assert_close(ckpt.aux_losses[name], value, rtol=0, atol=1e-6)
    assert [s.layer for s in ckpt.router_stats] == [s.layer for s in plain.router_stats]
    for a, b in zip(ckpt.router_stats, plain.router_stats):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
        torch.testing.assert_close(a.router_entropy, b.router_entropy, rtol=0, atol=1e-6)
    assert set(ckpt_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    if "mtp" in overrides:
        assert "mtp" in plain.aux_losses and any(name.startswith("mtp.") for name in plain_grads)


def test_noisy_router_draws_differ_between_steps_but_replay_within_one():
    """The equality above is not vacuous: another seed gives other gradients (noise and dropout
    are live), and the recomputation leaves the global RNG where a plain step leaves it."""
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(**CONFIGS["noisy_topk_and_dropout"]))
    ids = torch.randint(0, 53, (3, 16), generator=torch.Generator().manual_seed(1))
    _, grads_a = _step(model, ids, checkpointing=True, seed=7)
    after_ckpt = torch.get_rng_state()
    _, grads_b = _step(model, ids, checkpointing=True, seed=8)
    assert not torch.equal(grads_a["layers.0.self_attn.q_proj.weight"], grads_b["layers.0.self_attn.q_proj.weight"])
    _step(model, ids, checkpointing=False, seed=7)
    assert torch.equal(torch.get_rng_state(), after_ckpt)


def _saved_bytes(model: EnhancedMoEModel, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.loss.backward()
    return sum(storages.values())


def test_checkpointing_saves_far_fewer_activations():
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(num_layers=4)).train()
    ids = torch.randint(0, 53, (4, 32), generator=torch.Generator().manual_seed(1))
    model.set_activation_checkpointing(False)
    plain = _saved_bytes(model, ids)
    model.set_activation_checkpointing(True)
    ckpt = _saved_bytes(model, ids)
    # Inside a checkpointed layer nothing is saved (checkpoint's own hooks keep only a
    # placeholder); what remains is the embedding, final norm and the head.
    assert ckpt < 0.25 * plain, (ckpt, plain)


def test_checkpointing_is_training_only(monkeypatch):
    import Ava.models.decoder_layer as decoder_layer

    calls = []
    original = decoder_layer.checkpoint
    monkeypatch.setattr(decoder_layer, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg())
    model.set_activation_checkpointing(True)
    assert all(layer.activation_checkpointing for layer in model.layers)
    ids = torch.randint(0, 53, (2, 8))
    model.eval()
    with torch.no_grad():
        cached = model(ids, use_cache=True)
        model(ids[:, :1], past_key_values=cached.past_key_values, use_cache=True)
    model(ids, labels=ids)  # eval mode with autograd on: still plain
    model.train()
    with torch.no_grad():
        model(ids, labels=ids)
    assert calls == []
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # one per layer
    model.set_activation_checkpointing(False)
    assert not any(layer.activation_checkpointing for layer in model.layers)

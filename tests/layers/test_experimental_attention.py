"""Experimental attention layers: mixture-of-head (MoH), mixture of attention heads (MoA), gated
cross-attention."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.layers import Attention, RotaryEmbedding, build_attention_mask
from Ava.layers.cross_attention import CrossAttention
from Ava.layers.mixture_of_attention import MixtureOfAttentionHeads
from Ava.layers.mixture_of_heads import MixtureOfHeadsAttention, route_heads
from Ava.models.decoder_layer import DecoderLayer


def _cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32})
    return ModelConfig(**{**base, **overrides})


def _inputs(cfg: ModelConfig, B: int = 2, T: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, cfg.hidden_size, generator=gen)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)(torch.arange(T).expand(B, T))
    return x, cos, sin


@pytest.mark.parametrize("moh", [{"top_k": 4}, {"shared_heads": 1, "top_k": 3}, {"shared_heads": 3, "top_k": 1}])
def test_moh_with_every_head_selected_and_equal_weights_is_standard_attention(moh):
    cfg = _cfg(attention="moh", moh=moh)
    torch.manual_seed(0)
    standard, mixture = Attention(cfg), MixtureOfHeadsAttention(cfg)
    mixture.load_state_dict(standard.state_dict(), strict=False)  # same q/k/v/o weights
    with torch.no_grad():  # uniform routers: every head weighted exactly 1
        for router in (mixture.router, mixture.shared_router, mixture.stage_router):
            if router is not None:
                router.weight.zero_()
    x, cos, sin = _inputs(cfg)
    ref, (k_ref, v_ref) = standard(x, cos, sin)
    out, (k, v), balance = mixture(x, cos, sin)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert balance.item() == pytest.approx(1.0)
    # and over a KV cache with a padding mask (generation's path)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    x2, cos2, sin2 = _inputs(cfg, T=2, seed=1)
    attn_mask = build_attention_mask(mask, 2, 7, x.device)
    ref2, _ = standard(x2, cos2, sin2, attn_mask, (k_ref, v_ref))
    out2, _, _ = mixture(x2, cos2, sin2, attn_mask, (k, v))
    assert torch.allclose(out2, ref2, atol=1e-6, rtol=1e-5)


def test_moh_weights_only_top_k_routed_heads_and_always_the_shared_ones():
    cfg = _cfg(attention="moh", moh={"shared_heads": 1, "top_k": 2})
    torch.manual_seed(0)
    mixture = MixtureOfHeadsAttention(cfg)
    x, _, _ = _inputs(cfg)
    g_BTH, _ = mixture.head_weights(x)
    assert g_BTH.shape == (2, 7, 4)
    assert (g_BTH[..., 0] > 0).all()  # the shared head
    assert ((g_BTH[..., 1:] > 0).sum(dim=-1) == 2).all()  # exactly top_k of the 3 routed heads


def test_head_router_balance_loss_is_one_when_uniform_and_larger_when_skewed():
    _, _, uniform = route_heads(torch.zeros(12, 4), 2)
    skewed_logits = torch.tensor([[4.0, 3.0, 0.0, 0.0]]).expand(12, 4)
    _, mask, skewed = route_heads(skewed_logits, 2)
    assert uniform.item() == pytest.approx(1.0)
    assert skewed.item() > 1.5 and mask.sum(dim=-1).eq(2).all()


def _moa(seed: int = 0, **moa) -> tuple[ModelConfig, MixtureOfAttentionHeads]:
    cfg = _cfg(attention="moa", num_kv_heads=1, moa={"num_experts": 8, "top_k": 3, **moa})
    torch.manual_seed(seed)
    layer = MixtureOfAttentionHeads(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # varied routing
    return cfg, layer


def test_moa_shapes_and_names():
    cfg, layer = _moa()
    A = cfg.head_dim
    assert layer.q_proj.weight.shape == (8 * A, 32) and layer.o_proj.weight.shape == (32, 8 * A)
    assert layer.k_proj.weight.shape == (A, 32) and layer.v_proj.weight.shape == (A, 32)
    assert layer.router.weight.shape == (8, 32)
    x, cos, sin = _inputs(cfg)
    out, (k, v), balance = layer(x, cos, sin)
    assert out.shape == x.shape and k.shape == v.shape == (2, 1, 7, A) and balance.ndim == 0


def test_moa_equals_dense_attention_over_all_experts_with_zero_weights_for_unpicked_ones():
    cfg, layer = _moa()
    x, cos, sin = _inputs(cfg)
    out, _, _ = layer(x, cos, sin)
    # Reference: every expert attends (E query heads over the one key/value head), then a
    # weighted sum over the picked experts with the renormalised top-k probabilities.
    q, k, v = layer._heads(x, cos, sin)
    heads_BETA = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).expand(-1, 8, -1, -1), v.transpose(1, 2).expand(-1, 8, -1, -1),
        is_causal=True)
    probs = torch.softmax(layer.router(x), dim=-1)
    top_p, top_i = probs.topk(3, dim=-1)
    w_BTE = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    mixed = heads_BETA.transpose(1, 2) * w_BTE.unsqueeze(-1)
    ref = layer.o_proj(mixed.reshape(2, 7, -1))
    assert torch.allclose(out, ref, atol=1e-6)


def test_moa_gradients_reach_every_expert():
    cfg, layer = _moa()
    A = cfg.head_dim
    x, cos, sin = _inputs(cfg, B=4, T=16)
    out, _, balance = layer(x, cos, sin)
    (out.square().mean() + balance).backward()
    for e in range(8):
        assert layer.q_proj.weight.grad[e * A:(e + 1) * A].abs().sum() > 0, e
        assert layer.o_proj.weight.grad[:, e * A:(e + 1) * A].abs().sum() > 0, e
    for p in (layer.k_proj.weight, layer.v_proj.weight, layer.router.weight):
        assert p.grad.abs().sum() > 0


def test_moa_is_deterministic():
    (cfg, a), (_, b) = _moa(seed=3), _moa(seed=3)
    x, cos, sin = _inputs(cfg)
    assert torch.equal(a(x, cos, sin)[0], a(x, cos, sin)[0])
    assert torch.equal(a(x, cos, sin)[0], b(x, cos, sin)[0])


def _cross_layer(gate: float = 0.7) -> tuple[ModelConfig, DecoderLayer]:
    # A dense MLP: each row's arithmetic is then independent of the other rows' values (a MoE
    # layer's expert blocks are not), so a row's bitwise equality shows the block left it alone.
    cfg = _cfg(cross_attention={"every": 1}, moe={"top_k": 2, "moe_intermediate_size": 32, "first_dense_layers": 2})
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        layer.cross_attn.gate.fill_(gate)  # open, so an unchanged stream is not the gate's doing
    return cfg, layer


def test_cross_attention_with_no_or_empty_context_leaves_the_residual_stream_unchanged():
    cfg, layer = _cross_layer()
    x, cos, sin = _inputs(cfg)
    with torch.no_grad():
        ref = layer(x, cos, sin, None, None)[0]
        block, layer.cross_attn = layer.cross_attn, None
        plain = layer(x, cos, sin, None, None)[0]  # the same layer without the block
        layer.cross_attn = block
        empty = layer(x, cos, sin, None, None, None, torch.zeros(2, 0, 32))[0]
        with_context = layer(x, cos, sin, None, None, None, torch.randn(2, 3, 32))[0]
    assert torch.equal(ref, plain) and torch.equal(empty, plain)
    assert not torch.allclose(with_context, plain)


def test_cross_attention_rows_with_a_fully_masked_context_are_unchanged():
    cfg, layer = _cross_layer()
    x, cos, sin = _inputs(cfg)
    context = torch.randn(2, 3, 32)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with torch.no_grad():
        plain = layer(x, cos, sin, None, None)[0]
        masked = layer(x, cos, sin, None, None, None, context, mask)[0]
        first_two = layer(x[:1], cos[:1], sin[:1], None, None, None, context[:1, :2])[0]
    assert torch.equal(masked[1], plain[1])  # no valid context vector: exactly the stream without the block
    assert torch.allclose(masked[0], first_two[0], atol=1e-6)  # masked vectors are ignored


def test_cross_attention_gate_starts_closed_and_gradients_reach_the_context():
    cfg = _cfg(cross_attention={"every": 1, "context_size": 16})
    torch.manual_seed(0)
    block = CrossAttention(cfg)
    x, _, _ = _inputs(cfg)
    context = torch.randn(2, 5, 16, requires_grad=True)
    out = block(x, context)
    assert torch.equal(out, torch.zeros_like(out))  # tanh(0) = 0
    out.sum().backward()
    assert block.gate.grad.abs() > 0  # the gate learns to open
    with torch.no_grad():
        block.gate.fill_(0.5)
    block(x, context).square().sum().backward()
    assert context.grad.abs().sum() > 0 and block.k_proj.weight.grad.abs().sum() > 0

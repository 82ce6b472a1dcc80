"""Attention: causality, GQA against a naive reference, KV cache, left padding, explicit head_dim and
full-width QK-norm."""

import math

import pytest
import torch
import torch.nn.functional as F

from Ava.config import ModelConfig
from Ava.layers import Attention, RotaryEmbedding, build_attention_mask
from Ava.layers.rotary import apply_rotary
from Ava.models import EnhancedMoEModel


def _cfg(backend: str = "grouped", **kw) -> ModelConfig:
    base = dict(
        vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
        max_seq_len=64, moe={"top_k": 2, "moe_intermediate_size": 32, "backend": backend},
    )
    base.update(kw)
    return ModelConfig(**base)


def _model(backend: str = "grouped", seed: int = 0, **kw) -> EnhancedMoEModel:
    torch.manual_seed(seed)
    return EnhancedMoEModel(_cfg(backend, **kw)).eval()


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_changing_a_future_token_leaves_past_logits_unchanged(backend):
    model = _model(backend)
    ids = torch.randint(0, 61, (2, 12))
    t = 6
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 61
    with torch.no_grad():
        a = model(ids).logits
        b = model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_gqa_attention_matches_naive_reference():
    cfg = _cfg(qk_norm=False)
    torch.manual_seed(0)
    attn = Attention(cfg)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)
    B, T, H, G, K = 2, 9, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = rope(torch.arange(T).expand(B, T))
    out, (k_cache, v_cache) = attn(x, cos, sin)
    assert k_cache.shape == (B, G, T, K)

    # Naive: explicit rotation by angle pos·θ_i on pairs (i, i + K/2), repeated kv, masked softmax.
    def rot(z):  # (B, T, h, K)
        inv = 1.0 / (10000.0 ** (torch.arange(0, K, 2).float() / K))
        ang = torch.arange(T).float()[:, None] * inv[None]  # (T, K/2)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        z1, z2 = z[..., : K // 2], z[..., K // 2 :]
        return torch.cat([z1 * c - z2 * s, z1 * s + z2 * c], -1)

    q = rot(attn.q_proj(x).view(B, T, H, K)).transpose(1, 2)
    k = rot(attn.k_proj(x).view(B, T, G, K)).transpose(1, 2).repeat_interleave(H // G, 1)
    v = attn.v_proj(x).view(B, T, G, K).transpose(1, 2).repeat_interleave(H // G, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(K)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * K))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_explicit_mask_matches_fast_causal_path():
    assert build_attention_mask(None, 5, 0, torch.device("cpu")) is None
    assert build_attention_mask(None, 1, 7, torch.device("cpu")) is None
    mask = build_attention_mask(torch.ones(1, 8, dtype=torch.long), 5, 3, torch.device("cpu"))
    assert mask.shape == (1, 1, 5, 8)
    expected = torch.arange(8)[None, :] <= torch.arange(3, 8)[:, None]
    assert torch.equal(mask[0, 0], expected)
    model = _model()
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        fast = model(ids).logits
        masked = model(ids, attention_mask=torch.ones(2, 10, dtype=torch.long)).logits
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_incremental_decoding_with_cache_matches_full_forward(backend):
    model = _model(backend)
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        assert len(past) == 2 and past[0][0].shape == (2, 2, 6, 8)
        # a 3-token chunk, then one token at a time
        out = model(ids[:, 6:9], past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
        for t in range(9, 14):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert past[0][0].shape[2] == 14


def test_left_padding_matches_unpadded_sequences():
    model = _model()
    short = torch.randint(1, 61, (1, 5))
    long = torch.randint(1, 61, (1, 8))
    pad = 3
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])  # (2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_short = model(short).logits
        ref_long = model(long).logits
        out = model(batch, attention_mask=mask, position_ids=pos, use_cache=True)
        torch.testing.assert_close(out.logits[0, pad:], ref_short[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits[1], ref_long[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out.logits).all()  # padding rows stay finite
        # Decode one more token per row with the cache and the extended mask.
        nxt = torch.randint(1, 61, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1,
                     past_key_values=out.past_key_values).logits
        ref_short2 = model(torch.cat([short, nxt[:1]], 1)).logits[:, -1]
        ref_long2 = model(torch.cat([long, nxt[1:]], 1)).logits[:, -1]
    torch.testing.assert_close(step[:, 0], torch.cat([ref_short2, ref_long2]), atol=1e-5, rtol=1e-5)


def test_attention_mask_of_wrong_length_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


def test_full_qk_norm_normalises_all_heads_at_once():
    cfg = _cfg(qk_norm_scope="full")
    torch.manual_seed(0)
    attn = Attention(cfg)
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert attn.q_norm.weight.shape == (H * K,) and attn.k_norm.weight.shape == (G * K,)
    assert Attention(_cfg()).q_norm.weight.shape == (K,)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    B, T = 2, 7
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = RotaryEmbedding(K, cfg.max_seq_len)(torch.arange(T).expand(B, T))
    out, (k_cache, _) = attn(x, cos, sin)

    # Reference (OLMoE): one RMS statistic over each token's whole projection, then split into heads.
    def rms(z, w):  # (B, T, F)
        return w * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    k_ref = apply_rotary(rms(attn.k_proj(x), attn.k_norm.weight).view(B, T, G, K), cos, sin).transpose(1, 2)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-6, rtol=1e-6)
    q = apply_rotary(rms(attn.q_proj(x), attn.q_norm.weight).view(B, T, H, K), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, G, K).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k_ref.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1),
                                         is_causal=True)
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(B, T, H * K)), atol=1e-5, rtol=1e-5)


def test_full_qk_norm_model_trains_a_step():
    model = _model(qk_norm_scope="full").train()
    norm = model.layers[0].self_attn.q_norm.weight
    assert norm.shape == (4 * 8,)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    before = norm.detach().clone()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and norm.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(norm.detach(), before)
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss


@pytest.mark.parametrize("kw", [{"head_dim": 12}, {"head_dim": 12, "qk_norm_scope": "full"}])
def test_cached_decoding_matches_full_forward_with_explicit_head_dim(kw):
    model = _model(**kw)
    assert model.layers[0].self_attn.q_proj.weight.shape == (4 * 12, 32)
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        assert out.past_key_values[0][0].shape == (2, 2, 6, 12)
        steps = [out.logits]
        for t in range(6, 10):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def _decode_model(**kw):
    from Ava.config import ModelConfig
    from Ava.models import EnhancedMoEModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
               max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 16})
    cfg.update(kw)
    return EnhancedMoEModel(ModelConfig(**cfg)).eval()


def _fused_adamw_step(model, ids):
    """One training step with AdamW(fused=True), which updates weights without bumping _version."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def test_decoding_fuses_qkv_from_entry_to_exit():
    """Entering model.decoding() copies q/k/v into one weight (before any forward), the fused
    path then gives the plain path's logits bit for bit (fp32), and leaving drops the copy."""
    model = _decode_model()
    for layer in model.layers:  # distinct q and k gains, so mixing them up would show
        torch.nn.init.normal_(layer.self_attn.q_norm.weight)
        torch.nn.init.normal_(layer.self_attn.k_norm.weight)
    ids = torch.randint(0, 50, (2, 9))
    assert all(layer.self_attn._qkv_weight is None for layer in model.layers)
    with torch.no_grad():
        plain = model(ids).logits
        with model.decoding():
            attn = model.layers[0].self_attn
            assert torch.equal(attn._qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                            attn.v_proj.weight]))
            fused = model(ids).logits
        assert all(layer.self_attn._qkv_weight is None and layer.self_attn._qk_gain is None
                   for layer in model.layers)
    assert torch.equal(fused, plain)  # the same arithmetic, merged calls (fp32 CPU)


def test_weights_changed_between_decoding_scopes_are_used():
    """Inside decoding() the weights are frozen: the copy is taken once per outermost scope (a
    nested scope and further forwards reuse it). A training step between two scopes (a fused
    optimizer, which does not bump _version) is picked up by the next scope."""
    model = _decode_model()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad(), model.decoding():
        copy = model.layers[0].self_attn._qkv_weight
        before = model(ids).logits
        with model.decoding():  # nested: the outer scope keeps its copies
            model(ids)
        assert model.layers[0].self_attn._qkv_weight is copy
    _fused_adamw_step(model, ids)
    with torch.no_grad():
        plain_now = model(ids).logits
        with model.decoding():
            after = model(ids).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain_now, rtol=1e-5, atol=1e-6)


def test_decoding_scope_exits_cleanly_on_an_exception():
    model = _decode_model()
    with pytest.raises(RuntimeError, match="boom"):
        with model.decoding():
            raise RuntimeError("boom")
    assert not model._decoding
    assert all(layer.self_attn._qkv_weight is None for layer in model.layers)


def test_decoding_scope_with_full_qk_norm_and_under_bf16_autocast():
    full = _decode_model(qk_norm_scope="full")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        plain = full(ids).logits
        with full.decoding():
            assert torch.equal(full(ids).logits, plain)
    model = _decode_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits.float()
        with model.decoding():
            fused = model(ids).logits.float()
    torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05)


def test_attention_traces_as_one_graph_with_a_dynamic_sequence_length():
    """performance.compile: after a change of T (sequence-length warmup) dynamo makes T dynamic;
    the causal flag must then still be a plain bool for SDPA, or the layer's graph breaks there."""
    cfg = _cfg()
    torch.manual_seed(0)
    attn = Attention(cfg)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)
    compiled = torch.compile(attn, dynamic=True, fullgraph=True, backend="eager")  # fullgraph: a break raises
    for T in (8, 12, 1):
        x = torch.randn(2, T, cfg.hidden_size)
        cos, sin = rope(torch.arange(T).expand(2, T))
        torch.testing.assert_close(compiled(x, cos, sin)[0], attn(x, cos, sin)[0])


@pytest.mark.parametrize("dtype, tol", [(None, 1e-6), (torch.bfloat16, 3e-2)])
def test_training_path_equals_the_inference_path(dtype, tol):
    """With autograd on, attention runs q/k/v as one GEMM and QK-norm + RoPE as one function
    (norm_rotary); without, three projections and the modules. Same outputs, fp32 and bf16."""
    cfg = _cfg()
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)
    B, T = 2, 11
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = rope(torch.arange(T).expand(B, T))
    outs = []
    for grad in (True, False):
        autocast = torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.set_grad_enabled(grad), autocast:
            out, (k, v) = attn(x.clone().requires_grad_(grad), cos, sin)
        outs.append((out.float().detach(), k.float().detach(), v.float().detach()))
    for trained, inferred in zip(*outs):
        torch.testing.assert_close(trained, inferred, rtol=tol, atol=tol)


def test_training_keeps_a_swapped_in_projection_module():
    """The fused q/k/v GEMM of training reads the weights directly, so it must not bypass a
    projection module someone swapped in (FP8, adapters): those run their own forward."""
    cfg = _cfg()
    torch.manual_seed(0)
    attn = Attention(cfg)
    calls = []

    class Tagged(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    tagged = Tagged(cfg.hidden_size, attn.k_proj.out_features, bias=False)
    tagged.weight = attn.k_proj.weight
    attn.k_proj = tagged
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)
    cos, sin = rope(torch.arange(5).expand(1, 5))
    attn(torch.randn(1, 5, cfg.hidden_size, requires_grad=True), cos, sin)
    assert calls == [1]


def _bf16_qkv(B=2, T=48, H=4, G=2, K=16, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(B, T, n, K).to(torch.bfloat16).transpose(1, 2).requires_grad_() for n in (H, G, G)]


def test_fp32_flash_backward_matches_sdpa_forward_and_is_at_least_as_accurate():
    """CPU bf16 training attention: the same forward kernel as SDPA (bit-identical output) and a
    backward in fp32 whose gradients are as close to an fp64 reference as the bf16 kernel's."""
    from Ava.layers.attention import attention

    q, k, v = _bf16_qkv()
    grad = torch.randn(q.shape).to(torch.bfloat16)
    out = attention(q, k, v, is_causal=True)
    assert out.grad_fn.name() == "_FlashAttentionFP32BackwardBackward"  # the rule picked it
    ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, ref_out)
    ours = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward called inside autocast: still fp32
        for g_in, g_out in zip(torch.autograd.grad(out, (q, k, v), grad), ours):
            assert torch.equal(g_in, g_out)
    sdpa = torch.autograd.grad(ref_out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True),
                                (q64, k64, v64), grad.double())
    for g_ours, g_sdpa, g_exact in zip(ours, sdpa, exact):
        assert g_ours.dtype == torch.bfloat16 and g_ours.shape == g_exact.shape
        scale = g_exact.abs().max()
        err_ours = (g_ours.double() - g_exact).abs().max() / scale
        err_sdpa = (g_sdpa.double() - g_exact).abs().max() / scale
        assert err_ours < 2e-2 and err_ours <= 1.25 * err_sdpa


def test_fp32_flash_backward_only_where_the_rule_allows():
    from Ava.layers.attention import FP32_BACKWARD_MAX_TA, use_fp32_flash_backward

    q = _bf16_qkv()[0]
    assert use_fp32_flash_backward(q, masked=False, dropout_p=0.0)
    assert not use_fp32_flash_backward(q, masked=True, dropout_p=0.0)  # masks: plain SDPA
    assert not use_fp32_flash_backward(q, masked=False, dropout_p=0.1)
    assert not use_fp32_flash_backward(q.detach().float().requires_grad_(), masked=False, dropout_p=0.0)
    with torch.no_grad():
        assert not use_fp32_flash_backward(q, masked=False, dropout_p=0.0)
    long_q = torch.zeros(1, 2, FP32_BACKWARD_MAX_TA // 16 + 1, 16, dtype=torch.bfloat16, requires_grad=True)
    assert not use_fp32_flash_backward(long_q, masked=False, dropout_p=0.0)


def test_bf16_training_attention_takes_the_fp32_backward_and_trains(monkeypatch):
    """Under bf16 autocast the model's attention goes through the fp32 backward (every layer),
    gradients reach the projections, and evaluation keeps plain SDPA."""
    from Ava.layers import attention as attention_module

    calls = []
    apply = attention_module._FlashAttentionFP32Backward.apply
    monkeypatch.setattr(attention_module._FlashAttentionFP32Backward, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    model = _model().train()
    x = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).logits
    assert len(calls) == len(model.layers)
    logits.float().sum().backward()
    assert all(layer.self_attn.q_proj.weight.grad.abs().sum() > 0 for layer in model.layers)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert len(calls) == len(model.layers)


def test_bf16_training_attention_under_activation_checkpointing_gives_the_same_gradients():
    """The recomputed forward in backward takes the same attention path: gradients bit-identical."""
    model = _model().train()
    x = torch.randint(0, 61, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        logits.float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for with_ckpt, without in zip(grads[1], grads[0]):
        assert torch.equal(with_ckpt, without)

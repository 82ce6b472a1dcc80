"""How the model combines the balancing terms: the layer reduction and which top-k f counts."""

import pydantic
import pytest
import torch

from Ava.config import ModelConfig
from Ava.layers.routing import count_per_expert
from Ava.losses import global_balancing_loss, sequence_balancing_loss
from Ava.models import EnhancedMoEModel

TERMS = {"aux_loss_coef": 0.01, "seq_aux_loss_coef": 0.02, "global_aux_loss_coef": 0.03, "z_loss_coef": 0.004}


def _cfg(**moe_kw) -> ModelConfig:
    moe = {"top_k": 2, "moe_intermediate_size": 32, **TERMS, **moe_kw}
    # 3 decoder layers + 1 MTP block = 4 MoE layers: dividing by 4 and multiplying back is exact.
    return ModelConfig(vocab_size=53, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       num_experts=8, max_seq_len=32, moe=moe, mtp={"num_heads": 1})


def _aux(reduction: str, **moe_kw):
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(balance_reduction=reduction, **moe_kw)).train()
    ids = torch.randint(0, 53, (3, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    return out.aux_losses, len(out.router_stats)


@pytest.mark.parametrize("moe_kw", [{}, {"aux_free_bias": True, "capacity_factor": 1.0}], ids=["dropless", "bias_capacity"])
def test_sum_is_mean_times_the_number_of_moe_layers(moe_kw):
    mean, layers = _aux("mean", **moe_kw)
    total, _ = _aux("sum", **moe_kw)
    assert layers == 4  # the MTP block's router counts as a layer
    balance = {"load_balance", "seq_load_balance", "global_load_balance", "z_loss"}
    assert balance <= set(mean) and set(mean) == set(total)
    assert torch.equal(mean["mtp"], total["mtp"])  # not a routing term: untouched
    for name in balance:
        assert torch.equal(total[name], mean[name] * layers), name


def test_default_is_mean_and_other_reductions_are_rejected():
    assert _cfg().moe.balance_reduction == "mean"
    with pytest.raises(pydantic.ValidationError):
        _cfg(balance_reduction="max")


def _routings(model: EnhancedMoEModel, ids: torch.Tensor):
    """Forward with labels; also return every router's output, captured by forward hooks."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_sequence_and_global_losses_count_the_unbiased_topk(router):
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(router=router, aux_free_bias=True)).train()
    with torch.no_grad():  # confident routers, so where f is counted shows in the loss
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf[3] = 10.0  # the biased choice always includes expert 3
    B = 3
    ids = torch.randint(0, 53, (B, 16), generator=torch.Generator().manual_seed(1))
    out, routings = _routings(model, ids)
    assert len(routings) == 4
    seq_free, seq_biased, glob_free, glob_biased = [], [], [], []
    for r in routings:
        affinity_TE = r.logits_TE.sigmoid() if router == "sigmoid" else r.probs_TE
        free_TK = affinity_TE.topk(2, dim=-1).indices  # DeepSeek-V3 eq. 18: top-k of s_i,t alone
        assert (r.indices_TK == 3).any(dim=-1).all()
        seq_free.append(sequence_balancing_loss(r.probs_TE, free_TK, B))
        seq_biased.append(sequence_balancing_loss(r.probs_TE, r.indices_TK, B))
        glob_free.append(global_balancing_loss(r.probs_TE, count_per_expert(free_TK, 8)))
        glob_biased.append(global_balancing_loss(r.probs_TE, r.tokens_per_expert_E))
    seq, glob = out.aux_losses["seq_load_balance"], out.aux_losses["global_load_balance"]
    torch.testing.assert_close(seq, TERMS["seq_aux_loss_coef"] * torch.stack(seq_free).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(glob, TERMS["global_aux_loss_coef"] * torch.stack(glob_free).mean(), rtol=1e-6, atol=0)
    assert abs(seq / (TERMS["seq_aux_loss_coef"] * torch.stack(seq_biased).mean()) - 1) > 1e-3  # vs 1e-6 above
    assert abs(glob / (TERMS["global_aux_loss_coef"] * torch.stack(glob_biased).mean()) - 1) > 1e-3  # vs 1e-6 above
    # the stats carry both counts: the biased routed load (bias update, metrics) and the unbiased one
    for stats, r in zip(out.router_stats, routings):
        assert torch.equal(stats.tokens_per_expert, r.tokens_per_expert_E)
        assert torch.equal(stats.balance_tokens_per_expert, count_per_expert(r.unbiased_indices_TK, 8))


def test_bias_update_reads_the_load_before_capacity_dropping():
    torch.manual_seed(0)
    model = EnhancedMoEModel(_cfg(aux_free_bias=True, capacity_factor=0.5)).train()
    ids = torch.randint(0, 53, (3, 16), generator=torch.Generator().manual_seed(1))
    out, routings = _routings(model, ids)
    for stats, r in zip(out.router_stats, routings):
        assert int(r.dropped_E.sum()) > 0
        assert torch.equal(stats.tokens_per_expert, r.tokens_per_expert_E + r.dropped_E)  # routed, not kept
        assert int(stats.tokens_per_expert.sum()) == 3 * 16 * 2


def test_the_trainer_feeds_the_global_loss_the_unbiased_counts_of_earlier_micro_batches(tmp_path, corpus_cache):
    """With the aux-free bias on and gradient accumulation, micro-batch 2's prefix is micro-batch
    1's unbiased top-k counts, not the biased selection's."""
    from Ava.data import prepare_data
    from Ava.training import EnhancedModularTrainer
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, corpus_cache, "model.moe.aux_free_bias=true", "model.moe.global_aux_loss_coef=0.01",
                         "training.grad_accum_steps=2")
    trainer = EnhancedModularTrainer.from_config(config)
    trainer.prepare(prepare_data(config.data, config.run.seed, tmp_path / "tokenizer.json"))
    for layer in trainer.model.layers:
        if layer.is_moe:
            layer.mlp.gate.expert_bias[0] = 10.0  # every token's selection includes expert 0
    seen = []
    forward = trainer.model.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("moe_load_prefix"), out.router_stats))
        return out

    trainer.model.forward = recording
    trainer.train_step(next(trainer.feed.optimizer_steps(1)))
    (first_prefix, first_stats), (second_prefix, _) = seen
    assert first_prefix is None
    for prefix, stats in zip(second_prefix, first_stats, strict=True):
        assert torch.equal(prefix, stats.balance_tokens_per_expert)
        assert not torch.equal(prefix, stats.tokens_per_expert)

"""Padding of unpacked rows (``data.packing: false``) is routed but counted in no routing statistic.

The model's ``token_mask`` (from :func:`Ava.data.rows.pad_rows`) keeps right padding out of the
balancing losses, the z-loss, the expert loads (and so the aux-free bias update and the routing
metrics) and out of the capacity real tokens need; the outputs of real tokens do not change.
"""

from __future__ import annotations

import pytest
import torch

from Ava.config import ModelConfig
from Ava.data.rows import pad_rows
from Ava.evaluation.validation import validation_loss
from Ava.layers.routing import RouterOutput, apply_capacity, count_per_expert, route_expert_choice
from Ava.losses import global_balancing_loss, load_balancing_loss, router_z_loss, sequence_balancing_loss
from Ava.models import EnhancedMoEModel
from Ava.models.routing_metrics import RoutingTotals
from Ava.training.batch import StepBatches, model_inputs

V = 53
# every routing term on, at weight 1, so each is visible in aux_losses
TERMS = {"aux_loss_coef": 1.0, "seq_aux_loss_coef": 1.0, "global_aux_loss_coef": 1.0, "z_loss_coef": 1.0}
ROUTERS = {
    "softmax": {},
    "sigmoid_bias_groups": {"router": "sigmoid", "aux_free_bias": True, "n_groups": 2, "topk_groups": 1},
    "hash": {"router": "hash"},
}


def _model(mtp: int = 0, **moe_kw) -> EnhancedMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32, **TERMS, **moe_kw},
                      mtp={"num_heads": mtp})
    model = EnhancedMoEModel(cfg).eval()  # eval: logits returned, no noise; the terms are still computed
    for layer in model.decoder_layers():
        if layer.is_moe and layer.mlp.gate.expert_bias is not None:  # a bias that moves the choice
            layer.mlp.gate.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return model


def _rows(*lengths: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(sum(lengths))
    rows = []
    for n in lengths:
        ids = torch.randint(1, V, (n,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n),
                     "document_ids": torch.zeros(n, dtype=torch.long)})
    return rows


def _forward(model, batch, mask=True):
    inputs = model_inputs(batch, document_mask=False)
    if not mask:
        inputs.pop("token_mask", None)
    return model(batch["input_ids"], **inputs)


def _stat_values(out) -> dict[str, torch.Tensor]:
    values = {f"aux/{k}": v for k, v in out.aux_losses.items()}
    for s in out.router_stats:
        for name in ("tokens_per_expert", "balance_tokens_per_expert", "aux_loss", "z_loss", "router_entropy",
                     "logit_norm", "dropped_tokens", "unrouted_tokens", "num_tokens"):
            values[f"l{s.layer}/{name}"] = torch.as_tensor(getattr(s, name)).float()
    return values


def test_pad_rows_marks_real_tokens():
    batch = pad_rows(_rows(3, 5), pad_id=0)
    assert batch["token_mask"].dtype == torch.bool
    assert batch["token_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert model_inputs(batch, document_mask=False)["token_mask"] is batch["token_mask"]


@pytest.mark.parametrize("moe_kw", list(ROUTERS.values()), ids=list(ROUTERS))
def test_padded_row_has_the_statistics_of_the_row_alone(moe_kw):
    model = _model(**moe_kw)
    (row,) = _rows(10)
    alone = _stat_values(_forward(model, pad_rows([row])))  # no padding: an all-True mask
    padded = {k: v[:1] for k, v in pad_rows([row, *_rows(16)]).items()}  # the row + 6 pad tokens
    assert padded["token_mask"].sum() == 10 and padded["input_ids"].shape == (1, 16)
    masked = _stat_values(_forward(model, padded))
    unmasked = _stat_values(_forward(model, padded, mask=False))
    assert alone.keys() == masked.keys() and {"aux/load_balance", "aux/seq_load_balance",
                                              "aux/global_load_balance", "aux/z_loss"} <= alone.keys()
    for name, value in alone.items():
        assert torch.allclose(masked[name], value, rtol=0, atol=1e-6), name
    # without the mask padding pollutes them: the test would fail if the mask were ignored
    for name in ("aux/load_balance", "aux/z_loss", "l1/tokens_per_expert", "l1/balance_tokens_per_expert",
                 "l1/num_tokens"):
        assert not torch.allclose(unmasked[name], alone[name], rtol=0, atol=1e-4), name
    loads = [v for k, v in masked.items() if k.endswith("/tokens_per_expert")]
    assert loads and all(int(load.sum()) == 10 * 2 for load in loads)  # real tokens × top_k


def test_each_sequence_counts_its_own_real_tokens():
    model = _model()
    rows = _rows(7, 12)
    alone = [_forward(model, pad_rows([r])) for r in rows]
    both = _forward(model, pad_rows(rows))
    # loads add up; the sequence-wise loss is the mean of each row's own
    for k, s in enumerate(both.router_stats):
        assert torch.equal(s.tokens_per_expert, alone[0].router_stats[k].tokens_per_expert
                           + alone[1].router_stats[k].tokens_per_expert)
    seq = (alone[0].aux_losses["seq_load_balance"] + alone[1].aux_losses["seq_load_balance"]) / 2
    assert torch.allclose(both.aux_losses["seq_load_balance"], seq, rtol=0, atol=1e-6)
    z = (7 * alone[0].aux_losses["z_loss"] + 12 * alone[1].aux_losses["z_loss"]) / 19  # a mean over real tokens
    assert torch.allclose(both.aux_losses["z_loss"], z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mtp", [0, 1])
def test_real_token_outputs_do_not_depend_on_the_mask(mtp):
    model = _model(mtp=mtp)
    batch = pad_rows(_rows(5, 11, 8))
    masked, plain = _forward(model, batch), _forward(model, batch, mask=False)
    assert torch.equal(masked.logits, plain.logits)  # padding is computed, only not counted
    assert torch.equal(masked.lm_loss, plain.lm_loss)
    for a, b in zip(masked.mtp_logits or [], plain.mtp_logits or []):
        assert torch.equal(a, b)
    # every MoE layer (the MTP block's too) counts the 24 real tokens, not the 33 positions
    assert len(masked.router_stats) == 2 + mtp
    assert all(int(s.tokens_per_expert.sum()) == 24 * 2 for s in masked.router_stats)
    assert all(int(s.tokens_per_expert.sum()) == 33 * 2 for s in plain.router_stats)


def test_a_wrongly_shaped_mask_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="token_mask has shape"):
        model(torch.ones(2, 5, dtype=torch.long), token_mask=torch.ones(2, 4, dtype=torch.bool))


def test_packed_batches_carry_no_mask_and_an_all_true_mask_changes_nothing():
    window = {"input_ids": torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(3))}
    window["labels"] = window["input_ids"].clone()
    window["position_ids"] = torch.arange(12).repeat(2, 1)
    assert "token_mask" not in model_inputs(window, document_mask=False)
    model = _model(**ROUTERS["sigmoid_bias_groups"])
    plain = _stat_values(_forward(model, window))
    all_real = _stat_values(model(window["input_ids"], **model_inputs(window, False),
                                  token_mask=torch.ones(2, 12, dtype=torch.bool)))
    for name, value in plain.items():
        assert torch.allclose(all_real[name], value, rtol=0, atol=1e-6), name


# -- the losses and the router on their own -------------------------------------------------------


def test_losses_with_a_mask_equal_the_losses_of_the_real_tokens():
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(9, 4, generator=g, requires_grad=True)
    probs_TE = logits_TE.softmax(-1)
    idx_TK = probs_TE.topk(2, dim=-1).indices
    real_T = torch.tensor([True] * 6 + [False] * 3)
    counts = count_per_expert(idx_TK, 4, real_T)
    assert torch.equal(counts, count_per_expert(idx_TK[:6], 4))
    assert torch.allclose(load_balancing_loss(probs_TE, idx_TK, token_mask_T=real_T),
                          load_balancing_loss(probs_TE[:6], idx_TK[:6]), atol=1e-7)
    assert torch.allclose(router_z_loss(logits_TE, real_T), router_z_loss(logits_TE[:6]), atol=1e-6)
    assert torch.allclose(global_balancing_loss(probs_TE, counts, real_T),
                          global_balancing_loss(probs_TE[:6], counts), atol=1e-7)
    # a sequence of padding only is left out of the sequence-wise mean
    seq_real = torch.tensor([True] * 3 + [False] * 6)
    assert torch.allclose(sequence_balancing_loss(probs_TE, idx_TK, 3, seq_real),
                          sequence_balancing_loss(probs_TE[:3], idx_TK[:3], 1), atol=1e-7)
    # padding gets no gradient from the balancing terms
    (load_balancing_loss(probs_TE, idx_TK, token_mask_T=real_T) + router_z_loss(logits_TE, real_T)).backward()
    assert torch.all(logits_TE.grad[6:] == 0) and torch.any(logits_TE.grad[:6] != 0)


def _one_expert_routing(T: int) -> RouterOutput:
    """Every token's only choice is expert 0 (of 2): capacity must drop half of them."""
    idx_TK = torch.zeros(T, 1, dtype=torch.long)
    probs_TE = torch.tensor([[0.9, 0.1]]).expand(T, 2)
    return RouterOutput(idx_TK, torch.ones(T, 1), probs_TE.log(), probs_TE, count_per_expert(idx_TK, 2))


def test_capacity_serves_real_tokens_before_padding():
    real_T = torch.tensor([False, False, True, True])  # padding first: it would win by position
    plain = apply_capacity(_one_expert_routing(4), 1.0)  # C = ceil(4·1/2) = 2
    assert plain.mask_TK[:, 0].tolist() == [True, True, False, False]
    routing = apply_capacity(RouterOutput(**{**_one_expert_routing(4).__dict__, "token_mask_T": real_T}), 1.0)
    assert routing.mask_TK[:, 0].tolist() == [False, False, True, True]
    assert routing.tokens_per_expert_E.tolist() == [2, 0]  # what dispatch computes
    assert int(routing.dropped_slots) == 0 and int(routing.unrouted_tokens) == 0
    assert routing.routed_per_expert_E.tolist() == [2, 0]  # real tokens only
    # expert-choice: each expert picks real tokens before any padding
    x_TD = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    w_ED = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    real6 = torch.tensor([False, True, False, True, True, False])
    chosen = route_expert_choice(x_TD, w_ED, top_k=1, capacity_factor=1.0, token_mask_T=real6)  # c = 3
    assert chosen.mask_TK[real6].all() and not chosen.mask_TK[~real6].any()
    assert chosen.routed_per_expert_E.tolist() == [3, 3]


# -- end to end: the trainer's loads and the validation metrics -----------------------------------


def test_training_step_loads_count_real_tokens_only(tmp_path, corpus_cache):
    from Ava.data import prepare_data
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything
    from tests.training.test_dynamic_batching import _config, _write_chat

    _write_chat(tmp_path / "chat.jsonl", 40, 0)
    config = _config(tmp_path, corpus_cache, tmp_path / "runs", "model.moe.aux_free_bias=true",
                     "model.moe.bias_update_rate=0.01")
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    trainer.prepare(prepare_data(config.data, config.run.seed))
    seen: list[list[torch.Tensor]] = []
    update = trainer.model.update_expert_bias
    trainer.model.update_expert_bias = lambda loads: (seen.append([t.clone() for t in loads]), update(loads))[1]
    micro = [pad_rows([trainer.data.train[i] for i in range(j, j + 3)], pad_id=0) for j in (0, 3)]
    real = sum(int(b["token_mask"].sum()) for b in micro)
    padded = sum(b["input_ids"].numel() for b in micro)
    assert real < padded  # the rows do have padding
    loss_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    trainer.train_step(StepBatches(micro, loss_tokens, real_tokens=real))
    top_k = config.model.moe.top_k
    assert len(seen) == 1 and seen[0] and all(int(load.sum()) == real * top_k for load in seen[0])


def test_validation_routing_metrics_count_real_tokens_only():
    model = _model()
    samples = _rows(4, 9, 6, 9)
    totals = RoutingTotals()
    result = validation_loss(model, samples, batch_size=2, routing=totals)
    assert result["loss"] == result["loss"] and "max_vio" in result  # finite, with routing metrics
    assert all(int(load.sum()) == (4 + 9 + 6 + 9) * 2 for load in totals.counts)

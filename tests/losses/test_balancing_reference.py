"""Ava's balancing terms, z-loss and aux-free bias against Megatron-Core 0.16.1 and transformers 5.23.

Megatron-Core is a ``test``-extra dependency (pure-Python wheel, no torch of its own); its
balancing code runs on CPU. The references called here are Megatron's own functions, fed as a
single rank (world size 1, where every all-reduce is the identity):

* ``switch_load_balancing_loss_func``: Switch Transformers eq. (4)-(6), ``E · Σ_i f_i · P_i``;
* ``TopKRouter._apply_aux_loss`` / ``_apply_seq_aux_loss`` / ``_apply_global_aux_loss``: the
  batch, sequence-wise (DeepSeek-V3 eq. 17-20) and global-batch (Qwen, arXiv 2501.11873) forms,
  called unbound on a stand-in router so Megatron's reshapes and accumulation run as written;
* ``compute_routing_scores_for_aux_loss``: the scores the losses read (softmax, or DeepSeek-V3's
  normalised sigmoid affinities, eq. 19) and the unbiased top-k routing map (eq. 18);
* ``z_loss_func``: ST-MoE eq. (5); ``get_updated_expert_bias``: the aux-loss-free update of
  Wang et al. 2024 / DeepSeek-V3 (``b_i += γ · sign(mean load − load_i)``);
* ``topk_routing_with_score_function``: the gate weights, with the selection-only expert bias.

transformers' ``load_balancing_loss_func`` counts f over T tokens, not T·K slots, so for one
layer HF = K × Ava (value and gradient).

The loss FUNCTIONS are tested on explicit (probs, indices) inputs, never through the model wiring.
Ava computes in fp32; the references run in fp64 where they allow it (Megatron's softmax is
fp32 by construction), hence the ~1e-6 relative tolerances below.
"""

import types
import warnings

import pytest
import torch

from Ava.layers.routing import Router, route_sigmoid, route_topk
from Ava.losses import global_balancing_loss, load_balancing_loss, router_z_loss, sequence_balancing_loss

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe import moe_utils as mcore
    from megatron.core.transformer.moe.router import TopKRouter
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as hf_load_balancing_loss

RTOL, ATOL = 2e-6, 1e-9  # fp32 Ava vs fp64 reference (values ~1; observed worst ≲ 2e-7 relative)
BATCH = 4  # sequences in the batch; tokens 64 → 16 per sequence, 256 → 64

GRID = [
    (tokens, experts, k)
    for tokens in (64, 256)
    for experts in (4, 8, 64)
    for k in (1, 2, 8)
    if k <= experts
]
ROUTER_KINDS = ("softmax", "sigmoid")


def _ids(case):
    tokens, experts, k = case
    return f"T{tokens}-E{experts}-k{k}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP wake-ups on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_rank(monkeypatch):
    """Megatron as one rank: its all-reduces over TP/CP/DP groups are the identity."""
    monkeypatch.setattr(mcore, "reduce_from_tensor_model_parallel_region", lambda t, group=None: t)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **kw: None)
    monkeypatch.setattr(mcore.parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)


class _OneRankGroup:
    def size(self) -> int:
        return 1


def _megatron_router(experts: int, k: int, kind: str):
    """What ``TopKRouter._apply_*_aux_loss`` read from ``self``; the attached loss is captured."""
    captured = {}

    def attach(activation, coeff, aux_loss, name, group, reduce_group_has_dp=False, valid_token_count=None):
        captured[name] = aux_loss / coeff
        return activation

    router = types.SimpleNamespace(
        topk=k,
        score_function=kind,
        config=types.SimpleNamespace(num_moe_experts=experts, moe_router_fusion=False),
        tp_cp_group=_OneRankGroup(),
        tp_dp_cp_group=_OneRankGroup(),
        get_aux_loss_coeff=lambda name: 1.0,
        attach_and_log_load_balancing_loss=attach,
        global_tokens_per_expert=torch.zeros(experts),
        ga_steps=torch.tensor(0.0),
    )
    return router, captured


def _logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """(B·S, E) fp32 router logits, sequence-major, each sequence leaning to its own expert."""
    g = torch.Generator().manual_seed(seed)
    seq = tokens // BATCH
    lean = torch.zeros(BATCH, 1, experts)
    lean[torch.arange(BATCH), 0, torch.arange(BATCH) % experts] = 1.5
    return (torch.randn(BATCH, seq, experts, generator=g) + lean).reshape(tokens, experts)


def _ava_routing(logits_TE: torch.Tensor, k: int, kind: str, norm: bool = True, bias_E=None):
    """Ava's router on given logits: an identity router weight makes x·Wᵀ = logits exactly."""
    eye = torch.eye(logits_TE.shape[1])
    route = route_sigmoid if kind == "sigmoid" else route_topk
    return route(logits_TE, eye, k, norm, bias_E=bias_E)


def _megatron_scores(logits_TE: torch.Tensor, k: int, kind: str):
    """Megatron's (routing map, scores) for the aux losses: unbiased top-k on the scores."""
    return mcore.compute_routing_scores_for_aux_loss(logits_TE, k, kind)


def _to_megatron_layout(x_BSx: torch.Tensor, seq: int) -> torch.Tensor:
    """Ava rows are sequence-major (b·S + s); Megatron's are [S, B] (s·B + b)."""
    return x_BSx.reshape(BATCH, seq, -1).transpose(0, 1).reshape(BATCH * seq, -1)


def _assert_value_and_grad(ava_loss, ava_leaf, ref_loss, ref_leaf, scale: float = 1.0):
    """Value and gradient w.r.t. the logits; ``scale`` maps Ava's convention onto the reference's.

    Gradients are compared elementwise at RTOL, with an absolute floor of RTOL times the
    gradient's own scale (its largest entry, at least 1/T: a mean over T tokens), since entries
    that cancel to ~0 in fp64 (e.g. k = E, where f is uniform) are fp32 rounding noise in Ava.
    """
    ava_loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(ava_loss.double() * scale, ref_loss.detach().double(), rtol=RTOL, atol=ATOL)
    ref_grad = ref_leaf.grad.double()
    grad_atol = RTOL * max(ref_grad.abs().max().item(), 1.0 / ref_grad.shape[0])
    torch.testing.assert_close(ava_leaf.grad.double() * scale, ref_grad, rtol=RTOL, atol=grad_atol)


# --------------------------------------------------------------------------------------------
# Megatron-Core: batch, sequence-wise and global-batch balancing, z-loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_load_balancing_loss_matches_megatron(case, kind):
    tokens, experts, k = case
    logits = _logits(tokens, experts, seed=1 + tokens + experts + k).requires_grad_()
    ava = _ava_routing(logits, k, kind)
    ava_loss = load_balancing_loss(ava.probs_TE, ava.indices_TK)

    ref_logits = logits.detach().double().requires_grad_()
    routing_map, scores = _megatron_scores(ref_logits, k, kind)
    # the same scores (softmax / normalised sigmoid) and the same unbiased top-k
    torch.testing.assert_close(ava.probs_TE.double(), scores.double(), rtol=RTOL, atol=ATOL)
    assert torch.equal(torch.zeros_like(routing_map).scatter_(1, ava.indices_TK, True), routing_map)
    assert torch.equal(ava.tokens_per_expert_E, routing_map.sum(dim=0))
    router, captured = _megatron_router(experts, k, kind)
    TopKRouter._apply_aux_loss(router, scores, scores, routing_map)
    _assert_value_and_grad(ava_loss, logits, captured["load_balancing_loss"], ref_logits)
    # the bare function, with Ava's own counts: Switch eq. (4) with f over the T·K slots
    bare = mcore.switch_load_balancing_loss_func(
        ava.probs_TE.detach().double(), ava.tokens_per_expert_E, tokens, k, experts, 1.0
    )
    torch.testing.assert_close(ava_loss.detach().double(), bare, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_sequence_balancing_loss_matches_megatron(case, kind):
    tokens, experts, k = case
    seq = tokens // BATCH
    logits = _logits(tokens, experts, seed=2 + tokens + experts + k).requires_grad_()
    ava = _ava_routing(logits, k, kind)
    ava_loss = sequence_balancing_loss(ava.probs_TE, ava.indices_TK, BATCH)

    ref_logits = logits.detach().double().requires_grad_()
    routing_map, scores = _megatron_scores(_to_megatron_layout(ref_logits, seq), k, kind)
    router, captured = _megatron_router(experts, k, kind)
    TopKRouter._apply_seq_aux_loss(router, scores, scores, routing_map, seq, BATCH)
    _assert_value_and_grad(ava_loss, logits, captured["seq_load_balancing_loss"], ref_logits)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_global_balancing_loss_matches_megatron_over_micro_batches(case, kind):
    """Three equal micro-batches of one step: Ava's running prefix counts vs Megatron's buffer."""
    tokens, experts, k = case
    router, captured = _megatron_router(experts, k, kind)
    prefix_E = torch.zeros(experts, dtype=torch.long)
    for micro in range(3):
        logits = _logits(tokens, experts, seed=100 * micro + tokens + experts + k)
        logits[:, micro % experts] += 1.0  # micro-batches skewed differently: f_global ≠ f_local
        logits.requires_grad_()
        ava = _ava_routing(logits, k, kind)
        prefix_E = prefix_E + ava.tokens_per_expert_E  # what the model adds to the trainer's prefix
        ava_loss = global_balancing_loss(ava.probs_TE, prefix_E)

        ref_logits = logits.detach().double().requires_grad_()
        routing_map, scores = _megatron_scores(ref_logits, k, kind)
        TopKRouter._apply_global_aux_loss(router, scores, scores, routing_map)
        _assert_value_and_grad(ava_loss, logits, captured["global_load_balancing_loss"], ref_logits)
    assert router.ga_steps.item() == 3


@pytest.mark.parametrize("case", [(64, 8, 2), (256, 64, 8)], ids=_ids)
def test_router_z_loss_matches_megatron(case):
    tokens, experts, _ = case
    logits = (3 * _logits(tokens, experts, seed=7)).requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    _assert_value_and_grad(router_z_loss(logits), logits, mcore.z_loss_func(ref_logits, 1.0), ref_logits)


# --------------------------------------------------------------------------------------------
# Megatron-Core: gate weights and the aux-loss-free bias
# --------------------------------------------------------------------------------------------


# Megatron's sigmoid router has no un-normalised mode for k > 1: those cells are left out.
WEIGHT_GRID = [
    pytest.param(case, kind, norm, id=f"{_ids(case)}-{kind}-{'renorm' if norm else 'raw'}")
    for case in GRID
    for kind in ROUTER_KINDS
    for norm in (True, False)
    if not (kind == "sigmoid" and not norm and case[2] > 1)
]


@pytest.mark.parametrize(("case", "kind", "norm"), WEIGHT_GRID)
def test_gate_weights_match_megatron(case, kind, norm):
    """Ava's gate weights vs Megatron's top-k routing, with the aux-free bias for sigmoid.

    Conventions: Megatron's softmax router renormalises with ``use_pre_softmax=False`` (softmax of
    the top-k logits) and not with ``True``; its sigmoid router always renormalises, except at
    k = 1 where it keeps the raw score. Megatron adds the expert bias only for sigmoid scoring.
    """
    tokens, experts, k = case
    logits = _logits(tokens, experts, seed=3 + tokens + experts + k)
    bias = None
    if kind == "sigmoid":  # a bias large enough to change the selection
        bias = 0.1 * torch.randn(experts, generator=torch.Generator().manual_seed(5))
    ava = _ava_routing(logits, k, kind, norm=norm, bias_E=bias)
    ava_probs = torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, ava.indices_TK, ava.weights_TK.double())
    if kind == "sigmoid" and norm and k == 1:
        # Convention difference: Ava renormalises a single weight to 1 (no router gradient
        # through the gate); Megatron skips the renormalisation at k = 1 and keeps the raw score.
        torch.testing.assert_close(ava.weights_TK, torch.ones(tokens, 1))
        return
    ref_probs, ref_map = mcore.topk_routing_with_score_function(
        logits.double(), k, use_pre_softmax=not norm, score_function=kind, expert_bias=bias,
    )
    assert torch.equal(ava_probs != 0, ref_map)
    torch.testing.assert_close(ava_probs, ref_probs.double(), rtol=RTOL, atol=ATOL)
    if bias is not None:  # the bias moved the choice but not the weights
        unbiased = _ava_routing(logits, k, kind, norm=norm)
        assert not torch.equal(unbiased.indices_TK, ava.indices_TK)


def _loads(experts: int, steps: int, seed: int):
    """Integer loads per step, expert 0 exactly at the mean (sign(0) = 0: no move)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        load = torch.randint(0, 40, (experts,), generator=g)
        load[-1] += -load[1:].sum() % (experts - 1)  # the others' sum divisible by E − 1
        load[0] = load[1:].sum() // (experts - 1)  # = the mean over all E
        yield load


@pytest.mark.parametrize("experts", [4, 8, 64])
def test_aux_free_bias_update_matches_megatron(experts):
    rate = 1e-3
    router = Router(16, experts, top_k=2, kind="sigmoid", aux_free_bias=True)
    ref_bias = torch.zeros(experts)
    dsv3_bias = torch.zeros(experts)
    for step, load in enumerate(_loads(experts, steps=5, seed=experts)):
        assert load[0] * experts == load.sum()
        router.update_bias(load if step % 2 else load.float(), rate)
        ref_bias = mcore.get_updated_expert_bias(load.float(), ref_bias, rate)
        dsv3_bias = dsv3_bias + rate * torch.sign(load.float().mean() - load.float())  # b_i += γ·sign(mean − load_i)
        torch.testing.assert_close(router.expert_bias, ref_bias, rtol=0, atol=0)
        torch.testing.assert_close(router.expert_bias, dsv3_bias, rtol=0, atol=0)
    assert router.expert_bias[0] == 0 and router.expert_bias.abs().max() > 0


# --------------------------------------------------------------------------------------------
# transformers: load_balancing_loss_func (Mixtral; Qwen3-MoE's is the same code)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_load_balancing_loss_is_hf_over_top_k(case):
    """HF counts f over T tokens (Σ_i f_i = K); Ava over T·K slots (Σ_i f_i = 1): HF = K · Ava."""
    tokens, experts, k = case
    logits = _logits(tokens, experts, seed=4 + tokens + experts + k).double().requires_grad_()
    probs = logits.softmax(dim=-1)
    ava_loss = load_balancing_loss(probs, probs.topk(k, dim=-1).indices)
    ref_logits = logits.detach().clone().requires_grad_()
    hf_loss = hf_load_balancing_loss((ref_logits,), num_experts=experts, top_k=k)
    _assert_value_and_grad(ava_loss, logits, hf_loss, ref_logits, scale=k)


# --------------------------------------------------------------------------------------------
# negative controls: the comparisons above can fail
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_tokens_in_the_wrong_order_fail(kind):
    tokens, experts, k = 256, 8, 2
    seq = tokens // BATCH
    logits = _logits(tokens, experts, seed=11)
    ava = _ava_routing(logits, k, kind)
    good = sequence_balancing_loss(ava.probs_TE, ava.indices_TK, BATCH)

    # 1. routing shuffled across sequences, boundaries kept: the sequence-wise loss changes,
    #    while the batch loss (order-free) does not.
    perm = torch.randperm(tokens, generator=torch.Generator().manual_seed(0))
    shuffled = sequence_balancing_loss(ava.probs_TE[perm], ava.indices_TK[perm], BATCH)
    assert not torch.allclose(shuffled, good, rtol=1e-3)
    torch.testing.assert_close(
        load_balancing_loss(ava.probs_TE[perm], ava.indices_TK[perm]), load_balancing_loss(ava.probs_TE, ava.indices_TK)
    )

    # 2. Ava's sequence-major rows given to Megatron as if they were its [S, B] rows: mismatch.
    router, captured = _megatron_router(experts, k, kind)
    routing_map, scores = _megatron_scores(logits.double(), k, kind)  # no layout change
    TopKRouter._apply_seq_aux_loss(router, scores, scores, routing_map, seq, BATCH)
    assert not torch.allclose(captured["seq_load_balancing_loss"].double(), good.double(), rtol=1e-3)
    routing_map, scores = _megatron_scores(_to_megatron_layout(logits.double(), seq), k, kind)
    TopKRouter._apply_seq_aux_loss(router, scores, scores, routing_map, seq, BATCH)
    torch.testing.assert_close(captured["seq_load_balancing_loss"].double(), good.double(), rtol=RTOL, atol=ATOL)

    # 3. HF without the factor K: mismatch (the relation is not an identity by accident).
    hf = hf_load_balancing_loss((logits,), num_experts=experts, top_k=k)
    assert not torch.allclose(hf, load_balancing_loss(logits.softmax(-1), logits.topk(k, -1).indices), rtol=1e-3)

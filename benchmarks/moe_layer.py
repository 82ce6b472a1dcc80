"""Forward + backward time of one MoE layer per expert backend, against a dense SwiGLU.

The dense reference has the same active parameters per token (intermediate = top_k ×
moe_intermediate), so ``ratio`` is the overhead of routing, dispatch and combine over the matmuls
the MoE layer must do anyway. All variants run interleaved in the same process (warmup, then
``--repeats`` rounds; the median is reported), so machine noise hits them alike.

GFLOP/s counts the expert (or dense) SwiGLU matmuls only, forward + backward:
``6 · tokens · 3 · hidden · top_k · moe_intermediate`` (router and combine excluded), the same
numerator for every row.

    python benchmarks/moe_layer.py                       # defaults: 256 hidden, 8 experts, top-2
    python benchmarks/moe_layer.py --experts 64 --top-k 8 --moe-intermediate 128

``--fresh-routing`` gives every call a new input (a pool of 16), so the routing and every
expert's row count change from call to call as in training; the default reuses one input.
``--ablations`` adds the backends with parts of them switched back: ``exact rows`` (no padding of
expert blocks to multiples of 64 rows, which CPU bf16 uses: ``row_multiple``), ``autograd
SwiGLU`` (batched without its hand-written backward ``_BatchedSwiGLU``, which it uses below fp32;
in fp32 the two rows are the same code) and ``split gate/up`` (grouped with gate and up as two
GEMMs over slices of the fused weight, instead of one GEMM and ``_SwiGLUHalves``), ``fp32
combine`` (the slots' outputs weighted and summed over K in fp32 element-wise ops, instead of one
batched product per token) and ``two-pass dispatch`` (the slots gathered in expert order and then
scattered into the padded buffer, and back the same two ways, instead of one gather each way)
and ``recomputed silu`` (grouped recomputing ``silu(gate)`` in backward instead of keeping it)
and ``gathered combine`` (the slots' rows gathered into (T, K, D) and summed by one batched
product per token, and the dispatch's backward gathering and summing each token's K slot
gradients the same way, instead of one ``embedding_bag`` each) and ``summed dots`` (the combine's
weight gradient as a multiply and an fp32 sum over the (P, D) rows instead of ``_row_dots``).
``--skew 0.5`` skews the expert load (the setup line prints max/mean): the numbers behind
``resolve_backend``'s skew limit.

``--decode 1 2 4`` instead times the inference forward (no autograd) of the experts alone for that
many tokens, per path (``slots``, ``gathered``, ``grouped``, ``batched``), in µs and ÷ grouped:
the numbers behind ``decode_path``'s rule.

    python benchmarks/moe_layer.py --dtypes bf16 --tokens 2048 --fresh-routing --ablations
    python benchmarks/moe_layer.py --decode 1 2 3 4 --moe-intermediate 256
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
from collections.abc import Iterator
from typing import Callable

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

import Ava.layers.expert_dispatch as expert_dispatch
import Ava.layers.experts as experts_module
from Ava.config import ModelConfig
from Ava.layers import MoEBlock, SwiGLU
from Ava.layers.experts import DECODE_PATHS, EXPERT_BACKENDS

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _step_fn(module: torch.nn.Module, inputs: Iterator[torch.Tensor], grad: torch.Tensor,
             autocast: torch.dtype | None, moe: bool) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x = next(inputs)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            y = module(x) if moe else module(x[0])
            y = y.hidden_states if moe else y
        (y.float().view_as(grad) * grad).sum().backward()

    return step


def _split_gate_up_blocks(x_SD, offsets_E, counts_E, gate_up_proj_EID, down_proj_EDI):
    """The earlier grouped SwiGLU: gate and up as two grouped GEMMs over slices of the fused weight."""
    dtype, inter = x_SD.dtype, down_proj_EDI.shape[-1]
    gate_up_EID = gate_up_proj_EID.to(dtype)
    gate_SI = experts_module._grouped_matmul(x_SD, gate_up_EID[:, :inter].transpose(1, 2), offsets_E, counts_E)
    up_SI = experts_module._grouped_matmul(x_SD, gate_up_EID[:, inter:].transpose(1, 2), offsets_E, counts_E)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)
    return experts_module._grouped_matmul(F.silu(gate_SI) * up_SI, w_down_EID, offsets_E, counts_E)


def _fp32_combine(y_PD, plan):
    """The earlier combine: fp32 multiply of the slots' rows by their weights, sum over K, cast."""
    y_TKD = expert_dispatch.gather_slots(y_PD, plan)
    return (y_TKD.float() * plan.weights_TK.unsqueeze(-1)).sum(dim=1).to(y_PD.dtype)


class _SortedGather(torch.autograd.Function):
    """Rows ``x[index]`` whose backward gathers each token's K slot gradients back (the earlier
    dispatch's first pass); ``inverse`` maps token-major slots to rows of the result."""

    @staticmethod
    def forward(ctx, x_TD, index_S, inverse_S, top_k):
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, index_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (inverse_S,) = ctx.saved_tensors
        return grad_SD.index_select(0, inverse_S).view(-1, ctx.top_k, grad_SD.shape[-1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """``x[perm]`` whose backward is the inverse permutation's gather (the earlier un-sort)."""

    @staticmethod
    def forward(ctx, x_SD, perm_S, inverse_S):
        ctx.save_for_backward(inverse_S)
        return x_SD.index_select(0, perm_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (inverse_S,) = ctx.saved_tensors
        return grad_SD.index_select(0, inverse_S), None, None


def _two_pass(plan):
    """Index maps of the earlier dispatch: token of each sorted slot, buffer row of each sorted
    slot, and the sorted position of each token-major slot (dropless plans only)."""
    sorted_S = plan.order_S
    unsort_S = torch.empty_like(sorted_S)
    unsort_S[sorted_S] = torch.arange(sorted_S.numel(), device=sorted_S.device)
    return sorted_S // plan.top_k, plan.row_S[sorted_S], unsort_S


def _two_pass_dispatch(x_TD, plan):
    """The earlier dispatch: gather the slots sorted by expert, then scatter them into the
    zero-padded buffer (autograd ``index_copy``)."""
    token_S, buffer_row_S, unsort_S = _two_pass(plan)
    x_SD = _SortedGather.apply(x_TD, token_S, unsort_S, plan.top_k)
    if not plan.padded:
        return x_SD
    return x_SD.new_zeros(plan.rows, x_SD.shape[-1]).index_copy(0, buffer_row_S, x_SD)


def _two_pass_combine(y_PD, plan):
    """The earlier combine: gather the sorted slots out of the padded buffer (autograd
    ``index_select``), un-sort them (a gather both ways), then the batched weighted sum."""
    _, buffer_row_S, unsort_S = _two_pass(plan)
    y_SD = y_PD.index_select(0, buffer_row_S) if plan.padded else y_PD
    y_TKD = _Permute.apply(y_SD, unsort_S, plan.order_S).view(plan.num_tokens, plan.top_k, -1)
    return torch.bmm(plan.weights_TK.to(y_PD.dtype).unsqueeze(1), y_TKD).squeeze(1)


class _GatherSumDispatch(expert_dispatch._Dispatch):
    """The earlier dispatch backward: each token's K slot gradients gathered into (T, K, D) and summed."""

    @staticmethod
    def backward(ctx, grad_PD):
        row_S, _ = ctx.saved_tensors
        num_tokens, top_k, _ = ctx.sizes
        return grad_PD.index_select(0, row_S).view(num_tokens, top_k, -1).sum(dim=1), None


def _gathered_dispatch(x_TD, plan):
    return _GatherSumDispatch.apply(x_TD, plan)


class _SwiGLUHalvesRecompute(torch.autograd.Function):
    """The earlier ``_SwiGLUHalves``: keeps only ``h`` and recomputes ``silu(gate)`` in backward."""

    @staticmethod
    def forward(ctx, h_PF):
        ctx.save_for_backward(h_PF)
        inter = h_PF.shape[-1] // 2
        return F.silu(h_PF[:, :inter]) * h_PF[:, inter:]

    @staticmethod
    def backward(ctx, grad_PI):
        (h_PF,) = ctx.saved_tensors
        silu_PI = F.silu(h_PF[:, :grad_PI.shape[-1]])
        return experts_module._swiglu_halves_backward(grad_PI, h_PF, silu_PI)


@contextlib.contextmanager
def _ablation(name: str) -> Iterator[None]:
    """Switch one part of the experts back for the duration (``exact rows``, ``autograd SwiGLU``,
    ``split gate/up``, ``fp32 combine``, ``two-pass dispatch``, ``recomputed silu``, ``gathered combine``,
    ``summed dots``)."""
    names = ("row_multiple", "_grouped_swiglu_blocks", "combine", "dispatch", "_SwiGLUHalves")
    saved = {n: getattr(experts_module, n) for n in names}
    saved_apply = experts_module._BatchedSwiGLU.apply
    saved_dots = expert_dispatch._row_dots
    if name == "exact rows":
        experts_module.row_multiple = lambda x_TD: 1
    elif name == "autograd SwiGLU":
        experts_module._BatchedSwiGLU.apply = experts_module._batched_swiglu_autograd
    elif name == "split gate/up":
        experts_module._grouped_swiglu_blocks = _split_gate_up_blocks
    elif name == "fp32 combine":
        experts_module.combine = _fp32_combine
    elif name == "two-pass dispatch":
        experts_module.dispatch, experts_module.combine = _two_pass_dispatch, _two_pass_combine
    elif name == "gathered combine":
        experts_module.dispatch = _gathered_dispatch
        experts_module.combine = expert_dispatch.gather_bmm_combine
    elif name == "summed dots":
        expert_dispatch._row_dots = lambda a, b: (a * b).sum(dim=-1, dtype=torch.float32)
    elif name == "recomputed silu":
        experts_module._SwiGLUHalves = _SwiGLUHalvesRecompute
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(experts_module, n, fn)
        experts_module._BatchedSwiGLU.apply = saved_apply
        expert_dispatch._row_dots = saved_dots


def run(args: argparse.Namespace) -> list[dict]:
    cfg = ModelConfig(
        vocab_size=256, hidden_size=args.hidden, num_layers=1, num_heads=max(1, args.hidden // 64),
        num_experts=args.experts,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate},
    )
    torch.manual_seed(0)
    moe = MoEBlock(cfg)
    dense = SwiGLU(args.hidden, args.top_k * args.moe_intermediate)
    # --skew: every input shares a component along one random direction, so the experts whose
    # router rows point along it get more tokens (as at a real model's initialisation).
    # (drawn only when asked, so the default inputs stay those of the earlier recorded runs)
    shared_D = (args.skew * F.normalize(torch.randn(args.hidden), dim=0) * args.hidden ** 0.5 if args.skew else 0.0)
    pool = [torch.randn(1, args.tokens, args.hidden) + shared_D for _ in range(16 if args.fresh_routing else 1)]
    x = pool[0]
    grad = torch.randn_like(x)
    flops = 6.0 * args.tokens * 3 * args.hidden * args.top_k * args.moe_intermediate
    load = moe.gate(x[0]).tokens_per_expert_E.float()
    rows = []
    for dtype_name in args.dtypes:
        autocast = DTYPES[dtype_name]

        def backend_step(name: str, ablation: str = "") -> Callable[[], None]:
            inner = _step_fn(moe, itertools.cycle(pool), grad, autocast, moe=True)

            def step() -> None:
                moe.experts.backend = name
                with _ablation(ablation):
                    inner()

            return step

        variants = {
            "dense SwiGLU": _step_fn(dense, itertools.cycle(pool), grad, autocast, moe=False),
            "moe loop": backend_step("loop"),
            "moe grouped": backend_step("grouped"),
            "moe batched": backend_step("batched"),
        }
        if args.ablations:
            variants["moe grouped, exact rows"] = backend_step("grouped", "exact rows")
            variants["moe batched, exact rows"] = backend_step("batched", "exact rows")
            variants["moe batched, autograd SwiGLU"] = backend_step("batched", "autograd SwiGLU")
            variants["moe grouped, split gate/up"] = backend_step("grouped", "split gate/up")
            variants["moe grouped, fp32 combine"] = backend_step("grouped", "fp32 combine")
            variants["moe batched, fp32 combine"] = backend_step("batched", "fp32 combine")
            variants["moe grouped, two-pass dispatch"] = backend_step("grouped", "two-pass dispatch")
            variants["moe batched, two-pass dispatch"] = backend_step("batched", "two-pass dispatch")
            variants["moe grouped, recomputed silu"] = backend_step("grouped", "recomputed silu")
            variants["moe grouped, gathered combine"] = backend_step("grouped", "gathered combine")
            variants["moe batched, gathered combine"] = backend_step("batched", "gathered combine")
            variants["moe grouped, summed dots"] = backend_step("grouped", "summed dots")
        if args.only:
            unknown = sorted(set(args.only) - set(variants))
            if unknown:
                raise SystemExit(f"--only: unknown variants {unknown}; choose from {sorted(variants)}")
            variants = {name: fn for name, fn in variants.items() if name in args.only or name == "dense SwiGLU"}
        times = time_round_robin(variants, args.repeats, args.warmup)
        ref = statistics.median(times["dense SwiGLU"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"dtype": dtype_name, "variant": name, "ms": med * 1e3, "ratio": med / ref,
                         "gflops": flops / med / 1e9})
    print(f"Setup: torch {torch.__version__}, {torch.get_num_threads()} threads; tokens {args.tokens}, "
          f"hidden {args.hidden}, {args.experts} experts top-{args.top_k}, moe_intermediate "
          f"{args.moe_intermediate} (dense intermediate {args.top_k * args.moe_intermediate}); "
          f"load max/mean {load.max().item() / load.mean().item():.2f}; "
          f"{'fresh routing every call' if args.fresh_routing else 'one input'}; median of {args.repeats}")
    print("| dtype | variant | fwd+bwd ms | × dense | GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['gflops']:.0f} |")
    return rows


def run_decode(args: argparse.Namespace) -> None:
    """µs per inference forward of the experts (no autograd) for a few tokens, per path."""
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=1, num_heads=max(1, args.hidden // 64),
                      num_experts=args.experts,
                      moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate})
    torch.manual_seed(0)
    moe = MoEBlock(cfg)
    experts = moe.experts
    paths = {**DECODE_PATHS, "grouped": EXPERT_BACKENDS["grouped"], "batched": EXPERT_BACKENDS["batched"]}
    print(f"Setup: torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {args.hidden}, "
          f"{args.experts} experts top-{args.top_k}, moe_intermediate {args.moe_intermediate}; inference "
          f"forward of the experts, µs per call, median of {args.repeats} rounds of 200 calls")
    print("| tokens | token-slots | " + " | ".join(paths) + " | " + " | ".join(f"{p} ÷ grouped" for p in paths) + " |")
    print("|---:|---:|" + "---:|" * (2 * len(paths)))
    with torch.no_grad():
        for tokens in args.decode:
            x_TD = torch.randn(tokens, args.hidden)
            routing = moe.gate(x_TD)

            def call(fn=None):
                return lambda: [fn(x_TD, routing, experts.gate_up_proj, experts.down_proj) for _ in range(200)]

            times = time_round_robin({name: call(fn) for name, fn in paths.items()}, args.repeats, args.warmup)
            us = {name: statistics.median(ts) / 200 * 1e6 for name, ts in times.items()}
            print(f"| {tokens} | {tokens * args.top_k} | " + " | ".join(f"{us[p]:.0f}" for p in paths) + " | "
                  + " | ".join(f"{us[p] / us['grouped']:.2f}" for p in paths) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fresh-routing", action="store_true", help="a new input (and routing) every call")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="a shared input component of this size (× the noise) to skew the expert load")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="time only these variants (and the dense reference), e.g. --only 'moe grouped' "
                             "'moe grouped, split gate/up'")
    parser.add_argument("--ablations", action="store_true",
                        help="also the backends without row padding / with autograd SwiGLU")
    parser.add_argument("--decode", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="time the inference forward of the experts for these token counts instead")
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    if args.decode:
        run_decode(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

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
    python benchmarks/moe_layer.py --plot moe_vs_dense.png   # + a bar chart of each variant ÷ dense

``--fresh-routing`` gives every call a new input (a pool of 16), so the routing and every
expert's row count change from call to call as in training; the default reuses one input.
``--ablations`` adds variants that swap one kernel or dispatcher for an earlier or simpler one
(``routed_experts`` with another ``ExpertKernel`` or ``TokenDispatcher``; nothing is patched):
``exact rows`` (no padding of expert blocks to multiples of 64 rows, which CPU bf16 uses:
``kernels.registry.row_multiple``), ``autograd SwiGLU`` (batched without its hand-written
backward ``BatchedSwiGLU``, which it uses below fp32; in fp32 the two rows are the same code),
``split gate/up`` (grouped with gate and up as two GEMMs over slices of the fused weight),
``recomputed silu`` (grouped recomputing ``silu(gate)`` in backward instead of keeping it),
``fp32 combine`` (the slots' outputs weighted and summed over K in fp32 element-wise ops) and
``gathered combine`` (the slots' rows gathered into (T, K, D) and summed by one batched product
per token, the dispatch's backward gathering and summing each token's K slot gradients the same
way, instead of one ``embedding_bag`` each). ``--skew 0.5`` skews the expert load (the setup line
prints max/mean): the numbers behind ``auto``'s skew limit.

``--decode 1 2 4`` instead times the inference forward (no autograd) of the experts alone for that
many tokens, per path (``slots``, ``gathered``, ``grouped``, ``batched``), in µs and ÷ grouped:
the numbers behind the decode paths' thresholds (``kernels.decode``).

    python benchmarks/moe_layer.py --dtypes bf16 --tokens 2048 --fresh-routing --ablations
    python benchmarks/moe_layer.py --decode 1 2 3 4 --moe-intermediate 256

Measurements and the commands behind them: docs/performance.md ("MoE layer"; "Expert kernels and
dispatch: the measurements behind the choices").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Iterator
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

from Ava.config import ModelConfig
from Ava.layers import BufferLayout, ExpertKernel, LocalDispatcher, MoEBlock, SwiGLU, kernel_for, routed_experts
from Ava.layers.expert_kernels import grouped_matmul, swiglu_halves_backward
from Ava.layers.kernels import batched_autograd_kernel, experts_gathered, experts_slots
from Ava.layers.token_dispatcher import _Dispatch, gather_bmm_combine, gather_slots

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


# --------------------------------------------------------------------------------------------
# ablations: earlier or simpler kernels and dispatchers
# --------------------------------------------------------------------------------------------


def _split_gate_up_kernel(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI):
    """The earlier grouped SwiGLU: gate and up as two grouped GEMMs over slices of the fused weight."""
    dtype, inter = rows_RD.dtype, down_proj_EDI.shape[-1]
    offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
    gate_up_EFD = gate_up_proj_EFD.to(dtype)
    gate_RI = grouped_matmul(rows_RD, gate_up_EFD[:, :inter].transpose(1, 2), offsets_E, counts_E)
    up_RI = grouped_matmul(rows_RD, gate_up_EFD[:, inter:].transpose(1, 2), offsets_E, counts_E)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)
    return grouped_matmul(F.silu(gate_RI) * up_RI, w_down_EID, offsets_E, counts_E)


class _SwiGLUHalvesRecompute(torch.autograd.Function):
    """The earlier ``_SwiGLUHalves``: keeps only ``h`` and recomputes ``silu(gate)`` in backward."""

    @staticmethod
    def forward(ctx, h_RF):
        ctx.save_for_backward(h_RF)
        inter = h_RF.shape[-1] // 2
        return F.silu(h_RF[:, :inter]) * h_RF[:, inter:]

    @staticmethod
    def backward(ctx, grad_RI):
        (h_RF,) = ctx.saved_tensors
        silu_RI = F.silu(h_RF[:, :grad_RI.shape[-1]])
        return swiglu_halves_backward(grad_RI, h_RF, silu_RI)


def _recomputed_silu_kernel(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI):
    """The grouped kernel with :class:`_SwiGLUHalvesRecompute`."""
    dtype = rows_RD.dtype
    offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
    h_RF = grouped_matmul(rows_RD, gate_up_proj_EFD.to(dtype).transpose(1, 2), offsets_E, counts_E)
    act_RI = _SwiGLUHalvesRecompute.apply(h_RF)
    return grouped_matmul(act_RI, down_proj_EDI.to(dtype).transpose(1, 2), offsets_E, counts_E)


class _FP32CombineDispatcher(LocalDispatcher):
    """The earlier combine: fp32 multiply of the slots' rows by their weights, sum over K, cast."""

    def combine(self, y_RD, plan):
        y_TKD = gather_slots(y_RD, plan)
        return (y_TKD.float() * plan.weights_TK.unsqueeze(-1)).sum(dim=1).to(y_RD.dtype)


class _GatherSumDispatch(_Dispatch):
    """The earlier dispatch backward: each token's K slot gradients gathered into (T, K, D) and summed."""

    @staticmethod
    def backward(ctx, grad_RD):
        row_S, _ = ctx.saved_tensors
        num_tokens, top_k, _ = ctx.sizes
        return grad_RD.index_select(0, row_S).view(num_tokens, top_k, -1).sum(dim=1), None


class _GatheredCombineDispatcher(LocalDispatcher):
    """The earlier gathers: combine as a (T, K, D) gather and a batched product per token, the
    dispatch's backward as a gather and a sum over K."""

    def dispatch(self, x_TD, routing, layout=BufferLayout()):
        _, counts_E, plan = super().dispatch(x_TD.detach(), routing, layout)  # the plan only
        return _GatherSumDispatch.apply(x_TD, plan), counts_E, plan

    def combine(self, y_RD, plan):
        return gather_bmm_combine(y_RD, plan)


def _ablation(backend: str, ablation: str, compute_dtype: torch.dtype) -> tuple[ExpertKernel, LocalDispatcher]:
    """The kernel and dispatcher of one ablation of ``backend`` for this compute dtype on CPU."""
    kernel = kernel_for(backend, "cpu", compute_dtype)
    dispatcher = LocalDispatcher()
    if ablation == "exact rows":
        kernel = ExpertKernel(kernel.name, kernel.fn, BufferLayout(uniform=kernel.layout.uniform))
    elif ablation == "autograd SwiGLU":
        kernel = ExpertKernel(kernel.name, batched_autograd_kernel, kernel.layout)
    elif ablation == "split gate/up":
        kernel = ExpertKernel(kernel.name, _split_gate_up_kernel, kernel.layout)
    elif ablation == "recomputed silu":
        kernel = ExpertKernel(kernel.name, _recomputed_silu_kernel, kernel.layout)
    elif ablation == "fp32 combine":
        dispatcher = _FP32CombineDispatcher()
    elif ablation == "gathered combine":
        dispatcher = _GatheredCombineDispatcher()
    else:
        raise ValueError(f"unknown ablation {ablation!r}")
    return kernel, dispatcher


ABLATIONS = [("grouped", "exact rows"), ("batched", "exact rows"), ("batched", "autograd SwiGLU"),
             ("grouped", "split gate/up"), ("grouped", "recomputed silu"), ("grouped", "fp32 combine"),
             ("batched", "fp32 combine"), ("grouped", "gathered combine"), ("batched", "gathered combine")]


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

        compute_dtype = autocast or torch.float32

        def backend_step(name: str) -> Callable[[], None]:
            inner = _step_fn(moe, itertools.cycle(pool), grad, autocast, moe=True)

            def step() -> None:
                moe.experts.backend = name
                inner()

            return step

        def ablation_step(backend: str, ablation: str) -> Callable[[], None]:
            """The MoE block's forward (router, experts, shared experts) and backward, with the
            ablation's kernel and dispatcher in place of the registry's."""
            kernel, dispatcher = _ablation(backend, ablation, compute_dtype)
            inputs = itertools.cycle(pool)

            def step() -> None:
                moe.zero_grad(set_to_none=True)
                x_TD = next(inputs)[0]
                with torch.autocast("cpu", dtype=compute_dtype, enabled=autocast is not None):
                    y_TD = routed_experts(x_TD, moe.gate(x_TD), moe.experts.gate_up_proj, moe.experts.down_proj,
                                          kernel, dispatcher)
                    if moe.shared_experts is not None:
                        y_TD = y_TD + moe.shared_experts(x_TD)
                (y_TD.float().view_as(grad) * grad).sum().backward()

            return step

        variants = {
            "dense SwiGLU": _step_fn(dense, itertools.cycle(pool), grad, autocast, moe=False),
            "moe loop": backend_step("loop"),
            "moe grouped": backend_step("grouped"),
            "moe batched": backend_step("batched"),
        }
        if args.ablations:
            for backend, ablation in ABLATIONS:
                variants[f"moe {backend}, {ablation}"] = ablation_step(backend, ablation)
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
    kernels = {name: kernel_for(name, "cpu", torch.float32) for name in ("grouped", "batched")}
    paths = {"slots": experts_slots, "gathered": experts_gathered,
             **{name: lambda *a, k=kernel: routed_experts(*a, kernel=k) for name, kernel in kernels.items()}}
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


def plot_ratios(rows: list[dict], path: str, title: str) -> None:
    """Write a PNG of each MoE variant's time ÷ the dense SwiGLU's (one group of bars per dtype),
    with the dense reference as a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "dense SwiGLU"]
    ratio = {(r["dtype"], r["variant"]): r["ratio"] for r in rows}
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(dtypes), 3.6))
    for i, variant in enumerate(variants):
        xs = [d + (i - (len(variants) - 1) / 2) * width for d in range(len(dtypes))]
        heights = [ratio.get((dtype, variant), float("nan")) for dtype in dtypes]
        bars = ax.bar(xs, heights, width, label=variant.removeprefix("moe "))
        ax.bar_label(bars, fmt="%.2f×", fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense SwiGLU, same active parameters")
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_ylabel("forward + backward time ÷ dense")
    ax.set_ylim(0, max([1.0, *ratio.values()]) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


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
                        help="also the backends with one kernel or dispatcher part swapped for an earlier one")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also write the time ÷ dense of each variant as a bar chart to this PNG")
    parser.add_argument("--decode", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="time the inference forward of the experts for these token counts instead")
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    if args.decode:
        run_decode(args)
    else:
        rows = run(args)
        if args.plot:
            plot_ratios(rows, args.plot, f"one MoE layer, {args.experts} experts top-{args.top_k} (width "
                                         f"{args.moe_intermediate}), hidden {args.hidden}, {args.tokens} tokens, "
                                         f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()

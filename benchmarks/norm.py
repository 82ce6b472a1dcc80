"""Forward + backward time of Ava's RMSNorm paths against autograd over the plain ops.

1. fp32 RMSNorm: ``Ava.layers.norm.rms_norm`` (``_RMSNormFunction``: ATen's fused forward, an
   8-pass backward) against ``F.rms_norm`` under autograd (ATen's fused forward, its
   decomposition differentiated: on CPU the backward is about 17 element-wise passes).
2. Per-head QK-norm + RoPE of the queries (``--qk-shape``, B×T×H×K, fp32 and bf16):
   ``Ava.layers.rotary.norm_rotary`` against the module path (``RMSNorm``, then ``apply_rotary``,
   then the cast to the input dtype), as attention ran it in training before.

Variants interleaved in the same process, median of ``--repeats`` rounds of ``--calls`` calls;
``ratio`` = Ava ÷ the plain path.

    python benchmarks/norm.py                     # (8·256, 256) and (8·256, 512) rows, queries 8×256×4×64
    python benchmarks/norm.py --shapes 2048x256 --qk-shape 8x256x8x64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, add_fwd_bwd_args, apply_cpu_args, fwd_bwd_ms

from Ava.layers.norm import RMSNorm, rms_norm
from Ava.layers.rotary import RotaryEmbedding, apply_rotary, norm_rotary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x256", "2048x512"], help="ROWSxWIDTH")
    parser.add_argument("--qk-shape", default="8x256x4x64", help="BxTxHxK of the queries")
    add_fwd_bwd_args(parser, repeats=15, calls=10, warmup=3)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, forward + backward (x and gain), "
          f"ms per call, median of {args.repeats} rounds of {args.calls} calls")
    print("| rows × width | F.rms_norm (autograd) | Ava rms_norm | ratio |")
    print("|---|---:|---:|---:|")
    for shape in args.shapes:
        rows, width = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        x = torch.randn(rows, width, requires_grad=True)
        weight = torch.rand(width, requires_grad=True)
        grad = torch.randn(rows, width)

        ms = fwd_bwd_ms({
            "torch": lambda: F.rms_norm(x, (width,), weight, 1e-6),
            "ava": lambda: rms_norm(x, weight, 1e-6),
        }, grad, [x, weight], args)
        print(f"| {rows} × {width} | {ms['torch']:.2f} | {ms['ava']:.2f} | {ms['ava'] / ms['torch']:.2f} |")

    B, T, H, K = (int(v) for v in args.qk_shape.split("x"))
    cos, sin = RotaryEmbedding(K, T)(torch.arange(T).expand(B, T))
    norm = RMSNorm(K)
    print(f"\nQK-norm + RoPE of {B}×{T}×{H}×{K} queries, forward + backward, ms per call")
    print("| dtype | RMSNorm, apply_rotary, cast | Ava norm_rotary | ratio |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        q = torch.randn(B, T, H, K).to(dtype).requires_grad_()
        grad = torch.randn(B, T, H, K).to(dtype)

        ms = fwd_bwd_ms({
            "plain": lambda: apply_rotary(norm(q), cos, sin).to(dtype),
            "ava": lambda: norm_rotary(q, norm.weight, norm.eps, cos, sin),
        }, grad, [q, norm.weight], args)
        name = "fp32" if dtype == torch.float32 else "bf16"
        print(f"| {name} | {ms['plain']:.2f} | {ms['ava']:.2f} | {ms['ava'] / ms['plain']:.2f} |")


if __name__ == "__main__":
    main()

"""Training attention on CPU in bf16: ATen's flash kernel with its bf16 backward against Ava's
``attention`` with the same forward and the backward kernel in fp32.

For each sequence length T and head dim K: B = ``--tokens`` / T sequences, H = ``--width`` / K
query heads and H / 2 key/value heads (grouped-query), causal, the layout attention sees in
training (q, k, v transposed views of (B, T, heads, K)). Forward + backward of one layer, the
two variants interleaved in the same process, median of ``--repeats`` rounds of ``--calls``
calls; ``bf16 bwd ÷ fp32 bwd`` > 1 means the fp32 backward is faster. ``rule`` says which one
``Ava.layers.attention.use_fp32_flash_backward`` picks for the shape.

    python benchmarks/attention.py                          # T 128-1024 × K 32/64/128, 2,048 tokens
    python benchmarks/attention.py --seq-lens 256 --head-dims 64 --repeats 30   # the demo's shape
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, add_fwd_bwd_args, apply_cpu_args, fwd_bwd_ms

from Ava.layers.attention import _FlashAttentionFP32Backward, use_fp32_flash_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--tokens", type=int, default=2048, help="B·T per call")
    parser.add_argument("--width", type=int, default=512, help="H·K, the query projection's width")
    add_fwd_bwd_args(parser, repeats=9, calls=3, warmup=2)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bf16, causal, {args.tokens} tokens, "
          f"H·K = {args.width}, G = H / 2; forward + backward ms per call, median of {args.repeats} rounds of "
          f"{args.calls} calls")
    print("| T | K | B × H / G | SDPA (bf16 backward) | fp32 backward | bf16 bwd ÷ fp32 bwd | rule |")
    print("|---:|---:|---|---:|---:|---:|---|")
    for T in args.seq_lens:
        for K in args.head_dims:
            B, H = max(1, args.tokens // T), max(2, args.width // K)
            G = H // 2
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, T, n, K, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                       for n in (H, G, G))
            grad = torch.randn(B, H, T, K, dtype=torch.bfloat16)

            ms = fwd_bwd_ms({
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                "fp32": lambda: _FlashAttentionFP32Backward.apply(q, k, v, True),
            }, grad, [q, k, v], args)
            rule = "fp32" if use_fp32_flash_backward(q, False, 0.0) else "bf16"
            print(f"| {T} | {K} | {B} × {H} / {G} | {ms['sdpa']:.1f} | {ms['fp32']:.1f} | "
                  f"{ms['sdpa'] / ms['fp32']:.2f} | {rule} |")


if __name__ == "__main__":
    main()

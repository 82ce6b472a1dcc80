"""Forward + backward time of RMSNorm in fp32: Ava's hand-written backward against autograd's.

``Ava.layers.norm.rms_norm`` (``_RMSNormFunction``: ATen's fused forward, an 8-pass backward) is
timed against ``F.rms_norm`` under autograd (ATen's fused forward, its decomposition
differentiated: on CPU the backward is about 17 element-wise passes). Both interleaved in the
same process, median of ``--repeats`` rounds of ``--calls`` calls; ``ratio`` = Ava ÷ F.rms_norm.

    python benchmarks/norm.py                     # (8·256, 256) and (8·256, 512) rows
    python benchmarks/norm.py --shapes 2048x256
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

from Ava.layers.norm import rms_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x256", "2048x512"], help="ROWSxWIDTH")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
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

        def call(fn):
            def run() -> None:
                for _ in range(args.calls):
                    fn(x, weight).backward(grad)
                    x.grad = weight.grad = None
            return run

        times = time_round_robin({
            "torch": call(lambda a, w: F.rms_norm(a, (width,), w, 1e-6)),
            "ava": call(lambda a, w: rms_norm(a, w, 1e-6)),
        }, args.repeats, args.warmup)
        ms = {name: statistics.median(ts) / args.calls * 1e3 for name, ts in times.items()}
        print(f"| {rows} × {width} | {ms['torch']:.2f} | {ms['ava']:.2f} | {ms['ava'] / ms['torch']:.2f} |")


if __name__ == "__main__":
    main()

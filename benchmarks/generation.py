"""Greedy decode speed: Ava's TextGenerator (KV cache) vs transformers ``generate`` on the same weights.

One randomly initialised Ava model is saved, exported with ``ava export`` (Qwen3-MoE layout) and
loaded by ``transformers.AutoModelForCausalLM``; both then decode the same prompts greedily for a
fixed number of tokens (EOS ignored), interleaved round by round in the same process (median of
``--repeats``), so machine noise hits both alike. The generated ids are compared too: the two
implementations must produce the same greedy tokens. Needs the ``bench`` extra
(``pip install -e ".[bench]"``).

    python benchmarks/generation.py                      # hidden 256, 4 layers, 8 experts top-2
    python benchmarks/generation.py --batch 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from Ava.config import ModelConfig
from Ava.generation import TextGenerator
from Ava.generation.sampling import SamplingParams
from Ava.interop import export_hf
from Ava.models import EnhancedMoEModel


def build(args: argparse.Namespace, folder: Path):
    import transformers

    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128), num_experts=args.experts, max_seq_len=1024,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate, "backend": args.backend},
    )
    torch.manual_seed(0)
    ava = EnhancedMoEModel(cfg).eval()
    ava.save_pretrained(folder / "ava")
    export_hf(folder / "ava", folder / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
    return ava, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--backend", default="grouped", choices=["loop", "batched", "grouped", "auto"])
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ava, hf = build(args, Path(tmp))
    gen = TextGenerator(ava, tokenizer=None)
    prompts = torch.randint(2, args.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0, eos_id=None)
    n = args.new_tokens

    def run_ava() -> list[list[int]]:
        return gen.generate_ids_batch(prompts.tolist(), n, params)

    def run_hf() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    ids_ava, ids_hf = run_ava(), run_hf()  # warmup (and the parity check)
    same = sum(a == b for a, b in zip(ids_ava, ids_hf))
    times: dict[str, list[float]] = {"ava": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("ava", run_ava), ("transformers", run_hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tok = args.batch * n
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
          f"expert width {args.moe_intermediate}, vocab {args.vocab}, {ava.num_parameters():,} params; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"decode: batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, greedy, median of {args.repeats}")
    print(f"{'implementation':<14} {'s/run':>8} {'tok/s':>9}")
    for name, t in med.items():
        print(f"{name:<14} {t:>8.3f} {tok / t:>9.1f}")
    print(f"ratio ava / transformers: {med['transformers'] / med['ava']:.2f}x")
    print(f"greedy outputs identical: {same}/{args.batch} rows")


if __name__ == "__main__":
    main()

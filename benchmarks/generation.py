"""Greedy decode speed: Ava's TextGenerator (KV cache) vs transformers ``generate`` on the same weights.

One randomly initialised Ava model is saved, exported with ``ava export`` (Qwen3-MoE layout) and
loaded by ``transformers.AutoModelForCausalLM``; both then decode the same prompts greedily for a
fixed number of tokens (EOS ignored), interleaved round by round in the same process (median of
``--repeats``), so machine noise hits both alike. The generated ids are compared too: the two
implementations must produce the same greedy tokens. Needs the ``bench`` extra
(``pip install -e ".[bench]"``).

    python benchmarks/generation.py                      # hidden 256, 4 layers, 8 experts top-2
    python benchmarks/generation.py --batch 4 --new-tokens 64
    python benchmarks/generation.py --count-calls        # ATen calls per decoded token (no transformers needed)

``--speculative`` measures MTP self-speculative decoding instead (no transformers needed): a model
of the same shape with ``--mtp-heads`` MTP heads is trained briefly (``--train-steps`` AdamW steps
on the embedded Shakespeare corpus, read from Ava's cache, with a ``--vocab`` BPE trained on it),
so the heads' drafts mean something; then greedy decoding of held-out prompts with and without
``speculative=True`` is timed interleaved on that model (batch 1), and the acceptance statistics
and the identity of the outputs are printed.

    python benchmarks/generation.py --speculative                        # 2 MTP heads, 300 steps
    python benchmarks/generation.py --speculative --mtp-heads 1 --train-steps 600
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import time_round_robin

from Ava.config import ModelConfig
from Ava.generation import TextGenerator
from Ava.generation.sampling import SamplingParams
from Ava.interop import export_hf
from Ava.models import EnhancedMoEModel


def decode_model_config(args: argparse.Namespace) -> ModelConfig:
    """The benchmarked model: 64-wide heads, half as many kv heads, room for 1,024 positions."""
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128), num_experts=args.experts, max_seq_len=1024,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate, "backend": args.backend},
    )


def build(args: argparse.Namespace, folder: Path):
    import transformers

    cfg = decode_model_config(args)
    torch.manual_seed(0)
    ava = EnhancedMoEModel(cfg).eval()
    ava.save_pretrained(folder / "ava")
    export_hf(folder / "ava", folder / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf").eval()
    return ava, hf


def train_briefly(args: argparse.Namespace):
    """A model with MTP heads, trained ``--train-steps`` steps on the embedded corpus; and held-out prompts."""
    from Ava.data import AvaTokenizer
    from Ava.data.corpus import embedded_corpus

    docs = embedded_corpus()
    train_docs, held_out = docs[1:], docs[0]  # prompts come from a play the model never saw
    tok = AvaTokenizer.train([d.text for d in train_docs], vocab_size=args.vocab)
    stream = torch.tensor(tok.encode("".join(d.text for d in train_docs[:12])))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128), num_experts=args.experts, max_seq_len=1024,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate, "backend": args.backend},
        mtp={"num_heads": args.mtp_heads, "loss_weight": 0.3},
    )
    torch.manual_seed(0)
    model = EnhancedMoEModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.train_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    seq, batch = 128, 8
    start = time.perf_counter()
    model.train()
    for step in range(args.train_steps):
        offsets = torch.randint(0, len(stream) - seq, (batch,), generator=gen)
        ids = torch.stack([stream[o:o + seq] for o in offsets.tolist()])
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == args.train_steps:
            mtp = out.aux_losses["mtp"].item() / cfg.mtp.loss_weight  # mean over depths of L_j
            print(f"  step {step + 1}: lm loss {out.lm_loss.item():.3f}, mtp loss (mean over depths) {mtp:.3f}")
    print(f"trained {args.train_steps} steps × {batch}×{seq} tokens in {time.perf_counter() - start:.0f} s")
    held = tok.encode(held_out.text)
    prompt_gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(held) - args.prompt_len, (args.prompts,), generator=prompt_gen).tolist()
    return model.eval(), [held[s:s + args.prompt_len] for s in starts]


def speculative_main(args: argparse.Namespace) -> None:
    """Greedy tokens/s with and without MTP speculative decoding on a briefly trained model.

    A third row, ``perfect drafts``, runs the same speculative loop (drafting cost included) but
    replaces each step's drafts by the main model's own greedy continuation: the speed-up at 100 %
    acceptance, i.e. the ceiling the cost of drafting and verifying allows on this machine.
    """
    from Ava.generation import speculative
    from Ava.generation.speculative import SpeculativeStats

    model, prompts = train_briefly(args)
    gen = TextGenerator(model, tokenizer=None)
    params = SamplingParams(temperature=0, eos_id=None)
    n = args.new_tokens

    def run(speculative: bool) -> list[list[int]]:
        return [gen.generate_ids_batch([p], n, params, speculative=speculative)[0] for p in prompts]

    def run_spec() -> list[list[int]]:
        total = SpeculativeStats()
        out = []
        for p in prompts:  # one call per prompt: sum the per-call statistics
            out.append(gen.generate_ids_batch([p], n, params, speculative=True)[0])
            s = gen.speculative_stats
            for field in ("steps", "drafted", "accepted", "tokens", "forwards"):
                setattr(total, field, getattr(total, field) + getattr(s, field))
        gen.speculative_stats = total
        return out

    plain, spec = run(False), run_spec()  # warmup, parity, statistics
    stats = gen.speculative_stats
    same = sum(a == b for a, b in zip(plain, spec))
    real_draft = speculative.MTPDrafter.draft
    continuations = {tuple(p): p + out for p, out in zip(prompts, plain)}

    def perfect(self, k):  # pay for the real drafts, then use the main model's own continuation
        real_draft(self, k)
        full = next(c for p, c in continuations.items() if list(p) == self.tokens[:len(p)])
        return full[len(self.tokens): len(self.tokens) + k]

    def run_perfect() -> list[list[int]]:
        speculative.MTPDrafter.draft = perfect
        try:
            return run(True)
        finally:
            speculative.MTPDrafter.draft = real_draft

    times = time_round_robin({"greedy": lambda: run(False), "speculative": lambda: run(True),
                              "perfect drafts": run_perfect}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = len(prompts) * n
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
          f"expert width {args.moe_intermediate}, vocab {model.config.vocab_size}, {args.mtp_heads} MTP heads, "
          f"{model.num_parameters():,} params; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"decode: {len(prompts)} held-out prompts of {args.prompt_len} tokens, batch 1, {n} new tokens, greedy, "
          f"median of {args.repeats}")
    print(f"{'decoding':<15} {'s/run':>8} {'tok/s':>9} {'vs greedy':>10}")
    for name, t in med.items():
        print(f"{name:<15} {t:>8.3f} {tok / t:>9.1f} {med['greedy'] / t:>9.2f}x")
    print(f"speed-up speculative / greedy: {med['greedy'] / med['speculative']:.2f}x")
    print(f"acceptance: {stats.summary()}")
    print(f"greedy outputs identical: {same}/{len(prompts)} prompts")


def count_calls(args: argparse.Namespace) -> None:
    """ATen calls of one cached decode forward (one new token per row), as the generators run it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    cfg = decode_model_config(args)
    torch.manual_seed(0)
    model = EnhancedMoEModel(cfg).eval()
    ids = torch.randint(2, args.vocab, (args.batch, args.prompt_len))
    with torch.no_grad(), model.decoding():
        past = model(ids, use_cache=True).past_key_values
        positions = torch.full((args.batch, 1), args.prompt_len)
        with Counter():
            model(ids[:, -1:], past_key_values=past, use_cache=True, position_ids=positions)
    print(f"ATen calls per decode forward (batch {args.batch}, {args.layers} layers, inside model.decoding()): "
          f"{Counter.calls}")


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
    parser.add_argument("--speculative", action="store_true",
                        help="measure MTP speculative decoding on a briefly trained model instead")
    parser.add_argument("--mtp-heads", type=int, default=2, help="with --speculative: MTP heads (draft depth)")
    parser.add_argument("--train-steps", type=int, default=300, help="with --speculative: training steps")
    parser.add_argument("--prompts", type=int, default=4, help="with --speculative: held-out prompts")
    parser.add_argument("--count-calls", action="store_true",
                        help="count the ATen calls of one decode forward instead (what decode speed is bound by here)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_calls:
        count_calls(args)
        return
    if args.speculative:
        speculative_main(args)
        return

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
    times = time_round_robin({"ava": run_ava, "transformers": run_hf}, args.repeats)
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
    # The shared machine's speed drifts between rounds; a round's two runs are back to back, so
    # the per-round ratio is less exposed to the drift, and the best times to transient load.
    per_round = statistics.median(h / a for a, h in zip(times["ava"], times["transformers"]))
    print(f"  median of per-round ratios: {per_round:.2f}x; best time ratio: "
          f"{min(times['transformers']) / min(times['ava']):.2f}x")
    print(f"greedy outputs identical: {same}/{args.batch} rows")


if __name__ == "__main__":
    main()

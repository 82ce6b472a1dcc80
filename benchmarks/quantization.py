"""Post-training quantization: file size, validation perplexity and batch-1 decode speed per scheme.

Same run, same machine: the demo model (configs/demo.yaml's model section, random init, seed 0)
is saved in fp32 and bf16 and quantized with each scheme (``int8``, ``int4`` at group sizes 32,
64 and 128, ``fp8``); for each the ``model.safetensors`` size and the greedy batch-1 decode speed
(TextGenerator with the KV cache, every model cast to bf16 except the fp32 reference; variants
timed round by round, median of ``--repeats``) are printed with their ratios to bf16 and fp32.
Validation perplexity needs a trained model: ``--run RUN`` scores that run's checkpoint on its
validation split (as ``ava quantize`` does), otherwise configs/tiny.yaml is trained briefly
(about 15 s) into a temporary folder and scored (its own shapes; the demo shapes are timed).

    python benchmarks/quantization.py                  # sizes, decode speed, perplexity (tiny run)
    python benchmarks/quantization.py --run runs/demo_2026...   # perplexity of a trained run
    python benchmarks/quantization.py --run runs/demo_2026... --no-decode   # perplexities only
    python benchmarks/quantization.py --crossover      # packed kernel vs dequantize+matmul per row count

``--crossover`` times one quantized matmul per row count on the demo model's weight shapes:
the packed CPU kernel (bf16 activations) against dequantize-then-matmul, with the plain fp32 and bf16
matmuls for reference and the int8 kernel on fp32 inputs against rounding them to bf16 first, and prints the largest row count at which the packed kernel still wins
on every shape: the value of ``PACKED_MAX_ROWS`` in ``Ava.layers.quantized``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

REPO = Path(__file__).resolve().parents[1]

SCHEMES = (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("fp8", None))


def label(scheme: str, group_size: int | None) -> str:
    """``int4-g32``, ``int8``, ..."""
    return f"{scheme}-g{group_size}" if group_size else scheme


def crossover(args: argparse.Namespace) -> None:
    """Packed kernel vs dequantize+matmul, per row count, on the demo model's weight shapes."""
    from Ava.layers.quantized import QuantizedParameter

    torch.manual_seed(0)
    shapes = {"expert gate_up (1024, 256)": (1024, 256), "expert down (256, 512)": (256, 512),
              "attention q/o (256, 256)": (256, 256), "lm_head (8192, 256)": (8192, 256)}
    rows_list = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    wins: dict[str, dict[int, bool]] = {"int8": {}, "int4": {}}
    print(f"{'shape':28s} {'rows':>5s} {'fp32 us':>9s} {'bf16 us':>9s} " + " ".join(
        f"{s + ' ' + p:>14s}" for s in wins for p in ("packed", "dequant")) + f" {'i8 fp32-in':>11s} {'i8 via bf16':>11s}")
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k) * 0.05
        w_bf16 = w.bfloat16()
        quant = {"int8": QuantizedParameter.from_float(w, "int8"),
                 "int4": QuantizedParameter.from_float(w, "int4", 32)}
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            x32 = x.float()
            int8_ops = quant["int8"]._operands(None)
            variants = {"fp32": lambda x32=x32: F.linear(x32, w), "bf16": lambda x=x: F.linear(x, w_bf16),
                        # the int8 kernel on fp32 inputs, against rounding them to bf16 (what Ava does)
                        "int8 fp32-in": lambda x32=x32: torch._weight_int8pack_mm(x32, int8_ops[0], quant["int8"].scale),
                        "int8 via bf16": lambda x32=x32: torch._weight_int8pack_mm(
                            x32.bfloat16(), *int8_ops).float()}
            for scheme, q in quant.items():
                q._max_rows = 1 << 30  # the packed kernel at every row count on this instance
                variants[f"{scheme} packed"] = lambda x=x, q=q: type(q).linear(q, x)
                variants[f"{scheme} dequant"] = lambda x=x, q=q: F.linear(x, q.dequantize(torch.bfloat16))
            times = time_round_robin(variants, repeats=args.repeats, warmup=2)
            us = {key: statistics.median(t) * 1e6 for key, t in times.items()}
            for scheme in wins:
                wins[scheme][rows] = wins[scheme].get(rows, True) and us[f"{scheme} packed"] < us[f"{scheme} dequant"]
            print(f"{name:28s} {rows:5d} {us['fp32']:9.0f} {us['bf16']:9.0f} " + " ".join(
                f"{us[f'{s} {p}']:14.0f}" for s in wins for p in ("packed", "dequant"))
                + f" {us['int8 fp32-in']:11.0f} {us['int8 via bf16']:11.0f}")
    for scheme, by_rows in wins.items():
        best = 0
        for rows in rows_list:
            if not by_rows[rows]:
                break
            best = rows
        print(f"{scheme}: packed kernel faster than dequantize+matmul on every shape up to {best} rows")


def decode_tokens_per_s(models: dict[str, torch.nn.Module], args: argparse.Namespace, vocab: int) -> dict[str, float]:
    """Greedy batch-1 decode tokens/s of each model, timed round by round."""
    from Ava.generation import TextGenerator
    from Ava.generation.sampling import SamplingParams

    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, eos_id=None)
    gens = {name: TextGenerator(model, tokenizer=None) for name, model in models.items()}
    variants = {name: (lambda g=g: g.generate_ids_batch([prompt], args.new_tokens, params))
                for name, g in gens.items()}
    times = time_round_robin(variants, repeats=args.repeats, warmup=1)
    return {name: args.new_tokens / statistics.median(t) for name, t in times.items()}


def file_mib(folder: Path) -> float:
    """MiB of ``folder/model.safetensors``."""
    return (folder / "model.safetensors").stat().st_size / 2**20


def saved_variants(fp32: torch.nn.Module, work: Path, source: Path | None = None
                   ) -> tuple[dict[str, float], dict[str, torch.nn.Module]]:
    """``fp32``, its bf16 copy and one quantized copy per scheme (fp32 compute; a scheme whose group
    size does not divide the model's widths is left out), each saved under ``work`` as its
    checkpoint folder would hold it: ``model.safetensors`` MiB and the models.

    ``source`` is the checkpoint whose config and tokenizer the quantized folders copy (default:
    the fp32 folder written here).
    """
    from Ava.errors import AvaConfigError
    from Ava.optimization.quantization import quantize_model, save_quantized

    fp32.save_pretrained(work / "fp32")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.save_pretrained(work / "bf16")
    sizes = {"fp32": file_mib(work / "fp32"), "bf16": file_mib(work / "bf16")}
    models: dict[str, torch.nn.Module] = {"fp32": fp32, "bf16": bf16}
    for scheme, group in SCHEMES:
        name = label(scheme, group)
        model = copy.deepcopy(fp32)
        try:
            spec = quantize_model(model, scheme, group)
        except AvaConfigError:  # the group size does not divide the model's widths: left out
            continue
        save_quantized(model, spec, work / name, source or work / "fp32")
        sizes[name] = file_mib(work / name)
        models[name] = model
    return sizes, models


def trained_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """``--run``'s checkpoint, or configs/tiny.yaml trained briefly into ``work``."""
    from Ava.config import load_config
    from Ava.config.checkpoint_layout import resolve_checkpoint
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    if args.run:
        return resolve_checkpoint(args.run)
    config = load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={work / 'runs'}",
                                                          f"training.max_steps={args.train_steps}"])
    seed_everything(config.run.seed)
    summary = EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
    return resolve_checkpoint(summary.run_dir)


def perplexities(checkpoint: Path, max_tokens: int) -> dict[str, float | None]:
    """Validation perplexity of the checkpoint and of each scheme's quantized copy (None where
    the group size does not divide the model's widths)."""
    from Ava.cli.quantize_commands import validation_perplexity, validation_split
    from Ava.errors import AvaConfigError
    from Ava.models import EnhancedMoEModel
    from Ava.optimization.quantization import quantize_model

    split = validation_split(checkpoint, max_tokens)
    base = EnhancedMoEModel.from_pretrained(checkpoint)
    out: dict[str, float | None] = {"fp32": validation_perplexity(split, base, show=False)}
    out["bf16"] = validation_perplexity(split, copy.deepcopy(base).to(torch.bfloat16), show=False)
    for scheme, group in SCHEMES:
        model = copy.deepcopy(base)
        try:
            quantize_model(model, scheme, group)
        except AvaConfigError:
            out[label(scheme, group)] = None
            continue
        out[label(scheme, group)] = validation_perplexity(split, model, show=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crossover", action="store_true", help="only the packed-vs-dequantize row crossover")
    parser.add_argument("--run", default=None, help="a trained run or checkpoint for the perplexities")
    parser.add_argument("--train-steps", type=int, default=120, help="tiny-config steps without --run")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexities")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode timing")
    parser.add_argument("--ppl-tokens", type=int, default=50_000, help="validation tokens scored at most")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    sys.path.insert(0, str(REPO / "src"))
    if args.crossover:
        crossover(args)
        return

    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "demo.yaml").model
    fp32 = EnhancedMoEModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes, models = saved_variants(fp32, work)
        models = {name: m if name in ("fp32", "bf16") else m.to(torch.bfloat16) for name, m in models.items()}
        print(f"demo model ({sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode: batch 1, "
              f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}")
        speed = {} if args.no_decode else decode_tokens_per_s(models, args, cfg.vocab_size)
        print(f"{'variant':10s} {'file MiB':>9s} {'× bf16':>7s} {'tokens/s':>9s} {'× bf16':>7s} {'× fp32':>7s}")
        for name in models:
            row = f"{name:10s} {sizes[name]:9.2f} {sizes[name] / sizes['bf16']:7.3f} "
            row += (f"{speed[name]:9.1f} {speed[name] / speed['bf16']:7.2f} {speed[name] / speed['fp32']:7.2f}"
                    if speed else f"{'-':>9s} {'-':>7s} {'-':>7s}")
            print(row, flush=True)
        if args.no_ppl:
            return
        checkpoint = trained_checkpoint(args, work)
        ppl = perplexities(checkpoint, args.ppl_tokens)
        print(f"validation perplexity of {checkpoint} ({args.ppl_tokens:,} tokens at most; the bf16 row casts the "
              "whole model; quantized models score with fp32 activations)")
        for name, value in ppl.items():
            print(f"{name:10s} " + ("(group size does not divide the widths)" if value is None else
                                    f"{value:9.3f} {100 * (value / ppl['fp32'] - 1):+8.2f}%"))

if __name__ == "__main__":
    main()

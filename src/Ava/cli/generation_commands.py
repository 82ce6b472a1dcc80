"""``ava generate``, ``ava export`` and ``ava import``: parsers and plain functions (``ava eval`` is in
:mod:`Ava.cli.eval_commands`).

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ..data.records import plural
from ..errors import AvaConfigError, AvaDataError, AvaError
from ..utils.output_paths import check_output_dir, check_output_file
from .arg_types import decode_escapes, non_negative, non_negative_int, positive, positive_int, probability

if TYPE_CHECKING:
    from ..data import AvaTokenizer
    from ..memory import MemoryContext
    from ..models import EnhancedMoEModel

# option name → (type, help); the REPL's `:set` accepts the same names
_REPL_OPTIONS: dict[str, Callable[[str], object]] = {
    "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repetition_penalty": float, "no_repeat_ngram_size": int, "num_beams": int, "length_penalty": float,
    "seed": int,
}
_REPL_HELP = """commands:
  :set NAME VALUE   change an option ({names}); VALUE none clears top_k/top_p/min_p/seed
  :stop TEXT        add a stop string, \\n and \\t as in --stop (:stop with nothing clears them)
  :show             print the current options
  :help             this text
  :quit             leave (or Ctrl-D)
anything else is a prompt; write \\n for a newline inside it"""


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine cannot use, before any loading (one line, exit 2).

    Raises:
        AvaConfigError: ``device`` is not a torch device name, or names CUDA without a CUDA device.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise AvaConfigError(f"--device {device!r}: not a device; use cpu or cuda (cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise AvaConfigError(f"--device {device}: no CUDA device here (torch {torch.__version__}, "
                                 "cuda available: False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise AvaConfigError(f"--device {device}: this machine has "
                                 f"{plural(torch.cuda.device_count(), 'CUDA device')}; use cuda:0 … or --device cpu")


def check_out_folder(out: str | Path, force: bool) -> None:
    """Refuse an ``--out`` folder that cannot be written (read-only, a file in the way), or a
    non-empty one without ``--force``: before any work, in one line.

    Raises:
        AvaOutputError: ``out`` (or the folder it would be created in) is a file or not writable.
        AvaConfigError: ``out`` is a non-empty folder and ``force`` is False.
    """
    folder = check_output_dir(out, "--out")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise AvaConfigError(f"--out {folder} is a non-empty folder; choose another --out, or pass --force "
                             "to write into it (files of the same names are replaced, others stay)")


def _options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _REPL_OPTIONS} | {
        "stop_strings": list(args.stop or []), "speculative": bool(getattr(args, "speculative", False))}


def _check_memory_context(memory: MemoryContext, generator) -> MemoryContext:
    """``--memory-context [K]``: ``memory`` (the run's replay memory), checked against the loaded model
    (:meth:`MemoryContext.from_checkpoint` has already refused a model without cross-attention blocks).

    Raises:
        AvaConfigError: the model's context width is not the memory's.
    """
    cfg = generator.model.config
    width = memory.store.embeddings_ND.shape[1]
    if cfg.cross_attention.context_size != width:
        raise AvaConfigError(f"--memory-context: the memory's items have width {width}, the model's context_size is "
                             f"{cfg.cross_attention.context_size}; drop --memory-context")
    print(f"memory context: the {plural(memory.k, 'nearest item')} of {len(memory.store)} stored, per prompt",
          file=sys.stderr)
    return memory


def _context(generator, opts: dict, prompts: list[str]) -> dict:
    """``context`` / ``context_mask`` keyword arguments for ``prompts`` (``--memory-context``), or {}."""
    memory = opts.get("memory")
    if memory is None:
        return {}
    context, context_mask = memory(generator.model, [generator.encode(p) for p in prompts])
    return {} if context is None else {"context": context, "context_mask": context_mask}


def _report_speculative(generator, opts: dict) -> None:
    """With ``--speculative``: the acceptance statistics of the last call, on stderr."""
    if not opts.get("speculative"):
        return
    stats = generator.speculative_stats
    if stats is None:
        print("speculative: off for sampling (temperature > 0); use --temperature 0", file=sys.stderr)
    else:
        print(f"speculative: {stats.summary()}", file=sys.stderr)


def _run_one(generator, prompt: str, opts: dict, stream_to: TextIO | None, use_cache: bool, stop_at_eos: bool) -> str:
    """Generate the continuation of ``prompt``; streams it to ``stream_to`` when given."""
    def on_text(piece: str) -> None:
        stream_to.write(piece)
        stream_to.flush()

    full = generator.generate(
        prompt, max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_k=opts["top_k"],
        top_p=opts["top_p"], seed=opts["seed"], use_cache=use_cache, stop_at_eos=stop_at_eos,
        min_p=opts["min_p"], repetition_penalty=opts["repetition_penalty"],
        no_repeat_ngram_size=opts["no_repeat_ngram_size"], stop_strings=opts["stop_strings"],
        num_beams=opts["num_beams"], length_penalty=opts["length_penalty"],
        on_text=on_text if stream_to is not None else None, speculative=opts.get("speculative", False),
        **_context(generator, opts, [prompt]),
    )
    return full[len(prompt):]


def read_prompts(file: str | Path) -> list[str]:
    """The prompts of ``ava generate --file``: one per non-empty line, ``\\n`` inside a line a newline.

    Raises:
        AvaDataError: the file is missing, unreadable, not UTF-8, or holds no prompt at all.
    """
    from ..utils.input_files import read_input_text

    path = Path(file).expanduser()
    text = read_input_text(path, "--file", "a text file with one prompt per line")
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise AvaDataError(f"--file {path}: no prompts (the file is empty or holds only blank lines); "
                           "write one prompt per line")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    """``ava generate RUN_DIR|CKPT --prompt TEXT | --file FILE | --interactive``.

    Everything that can be refused without the model (device, prompt file, ``--out``, option
    combinations) is checked before the checkpoint is loaded.
    """
    from ..generation import TextGenerator

    check_device(args.device)
    prompts = read_prompts(args.file) if args.file is not None else None
    if args.out is not None:
        if prompts is None:
            raise AvaConfigError("--out is where --file writes its JSONL; --prompt and --interactive print to "
                                 "the terminal (redirect stdout to keep their text)")
        check_output_file(args.out, "--out")
    if prompts is not None and args.num_beams > 1 and args.speculative:
        raise AvaConfigError("--speculative is greedy decoding; it cannot be combined with --num-beams")
    if args.memory_context is not None and (args.num_beams > 1 or args.speculative):
        raise AvaConfigError(f"--memory-context is passed by sampling and greedy decoding; drop "
                             f"{'--num-beams' if args.num_beams > 1 else '--speculative'} or --memory-context")
    memory = None
    if args.memory_context is not None:  # read before the model: a checkpoint without a memory fails fast
        from ..memory import MemoryContext

        memory = MemoryContext.from_checkpoint(args.path, args.memory_context or None)
    generator = TextGenerator.from_pretrained(args.path, device=args.device, verify=not args.no_verify)
    opts = _options(args)
    if memory is not None:
        opts["memory"] = _check_memory_context(memory, generator)
    use_cache, stop_at_eos = not args.no_cache, not args.ignore_eos
    try:
        if args.interactive:
            return _repl(generator, opts, use_cache, stop_at_eos, sys.stdin, sys.stdout)
        if prompts is not None:
            code = _generate_file(generator, prompts, args.out, args.batch_size, opts, use_cache, stop_at_eos)
            _report_speculative(generator, opts)
            return code
        if args.stream:
            sys.stdout.write(args.prompt)
            _run_one(generator, args.prompt, opts, sys.stdout, use_cache, stop_at_eos)
            sys.stdout.write("\n")
        else:
            print(args.prompt + _run_one(generator, args.prompt, opts, None, use_cache, stop_at_eos))
        _report_speculative(generator, opts)
    except ValueError as err:  # invalid sampling option combination
        raise AvaConfigError(f"ava generate: {err}") from err
    return 0


def _generate_file(generator, prompts: list[str], out_path: str | None, batch_size: int, opts: dict,
                   use_cache: bool, stop_at_eos: bool) -> int:
    """``prompts`` → JSONL ``{prompt, completion, finish_reason}`` in ``out_path`` (None = stdout).

    A progress bar over the prompts (with ETA) runs on stderr when it is a terminal; the last
    line says how many completions were written where (on stderr when the JSONL goes to stdout).
    """
    from ..generation.sampling import SamplingParams
    from ..utils.progress import progress_bar

    if opts["num_beams"] > 1:
        params: SamplingParams = generator.sampling_params(
            repetition_penalty=opts["repetition_penalty"], no_repeat_ngram_size=opts["no_repeat_ngram_size"],
            stop_strings=opts["stop_strings"], stop_at_eos=stop_at_eos)
    else:
        params = generator.sampling_params(
            opts["temperature"], opts["top_k"], opts["top_p"], opts["min_p"], opts["repetition_penalty"],
            opts["no_repeat_ngram_size"], opts["stop_strings"], stop_at_eos)
    if out_path is not None:
        target = Path(out_path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "w", encoding="utf-8")
    else:
        out = sys.stdout
    written = 0

    def write(prompt: str, result) -> None:
        nonlocal written
        out.write(json.dumps({"prompt": prompt, "completion": result.text,
                              "finish_reason": result.finish_reason}, ensure_ascii=False) + "\n")
        written += 1

    try:
        with progress_bar(len(prompts), "generate", "prompt") as bar:
            if opts["num_beams"] > 1:
                for prompt in prompts:
                    write(prompt, generator.beam_search(prompt, opts["num_beams"], opts["max_new_tokens"], params,
                                                        opts["length_penalty"], use_cache))
                    out.flush()
                    bar.update(1)
            else:
                for start in range(0, len(prompts), batch_size):
                    chunk = prompts[start:start + batch_size]
                    seed = None if opts["seed"] is None else opts["seed"] + start
                    for prompt, result in zip(chunk, generator.generate_batch(
                            chunk, opts["max_new_tokens"], params, seed, use_cache,
                            speculative=opts["speculative"], **_context(generator, opts, chunk))):
                        write(prompt, result)
                    out.flush()
                    bar.update(len(chunk))
    finally:
        if out is not sys.stdout:
            out.close()
    if out is sys.stdout:
        print(f"wrote {plural(written, 'completion')} (JSONL) to stdout", file=sys.stderr)
    else:
        print(f"wrote {plural(written, 'completion')} to {target}")
    return 0


def _repl(generator, opts: dict, use_cache: bool, stop_at_eos: bool, stdin: TextIO, stdout: TextIO) -> int:
    """Read prompts and ``:commands`` from ``stdin`` until ``:quit`` or end of input.

    A bad command or option prints ``error: ...`` to stderr and the loop goes on.
    """
    interactive = stdin.isatty()
    stdout.write("Ava interactive generation; :help for commands, :quit to leave\n")
    while True:
        if interactive:
            stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith(":"):
                if _repl_command(line, opts, stdout):
                    break
                continue
            prompt = line.replace("\\n", "\n")
            stdout.write(prompt)
            _run_one(generator, prompt, opts, stdout, use_cache, stop_at_eos)
            stdout.write("\n")
            _report_speculative(generator, opts)
        except (ValueError, AvaError) as err:
            print(f"error: {err}", file=sys.stderr)
    return 0


def _repl_command(line: str, opts: dict, stdout: TextIO) -> bool:
    """Apply one ``:command``; returns True to quit. Raises ValueError on bad input."""
    head, text = (line[1:].split(maxsplit=1) + ["", ""])[:2]
    if head == "stop":  # raw text, not shlex (which turns \\n into n): escapes as in --stop
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]  # a quoted stop string keeps its outer spaces
        if text:
            opts["stop_strings"].append(decode_escapes(text))
        else:
            opts["stop_strings"].clear()
        return False
    try:
        parts = shlex.split(line[1:])
    except ValueError as err:
        raise ValueError(f"cannot parse {line!r}: {err}") from None
    name, rest = (parts[0], parts[1:]) if parts else ("", [])
    if name in ("quit", "exit", "q"):
        return True
    if name == "help":
        stdout.write(_REPL_HELP.format(names=", ".join(_REPL_OPTIONS)) + "\n")
    elif name == "show":
        shown = {k: v for k, v in opts.items() if k != "memory"} | ({"memory_context": opts["memory"].k}
                                                                    if opts.get("memory") is not None else {})
        stdout.write(json.dumps(shown, ensure_ascii=False) + "\n")
    elif name == "set":
        if len(rest) != 2 or rest[0] not in _REPL_OPTIONS:
            raise ValueError(f"usage: :set NAME VALUE with NAME one of {', '.join(_REPL_OPTIONS)}")
        key, text = rest
        if text.lower() == "none" and key in ("top_k", "top_p", "min_p", "seed"):
            opts[key] = None
            return False
        try:
            value = _REPL_OPTIONS[key](text)
        except ValueError:
            raise ValueError(f":set {key}: {text!r} is not a valid {_REPL_OPTIONS[key].__name__}") from None
        from ..generation.sampling import SamplingParams

        sampling_keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size")
        if key in sampling_keys:  # validate the new combination; raises ValueError with the reason
            SamplingParams(**({k: opts[k] for k in sampling_keys} | {key: value}))
        if key in ("max_new_tokens", "num_beams") and value < 1:
            raise ValueError(f":set {key}: must be ≥ 1, got {value}")
        opts[key] = value
    else:
        raise ValueError(f"unknown command {line!r}; :help lists the commands")
    return False


# --------------------------------------------------------------------------------------------
# export / import
# --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """``ava export RUN_DIR --format hf --out DIR``, ``--format gguf --quant Q --out FILE.gguf`` or
    ``--format peft --out DIR`` (a LoRA fine-tune's adapters)."""
    from ..utils.logging import setup_logging

    if args.format == "peft":
        from ..interop.peft_export import export_peft

        if args.dtype is not None or args.arch != "auto" or args.quant is not None:
            raise AvaConfigError("--dtype, --arch and --quant do not apply to --format peft (the adapters are "
                                 "written as trained, fp32)")
        check_out_folder(args.out, args.force)
        setup_logging()  # the export logs what it wrote where
        export_peft(args.path, args.out, verify=not args.no_verify)
        return 0
    if args.format == "gguf":
        from ..interop import export_gguf

        if args.dtype is not None or args.arch != "auto":
            raise AvaConfigError("--dtype and --arch are for --format hf; a GGUF export takes --quant "
                                 "(f32, f16, bf16, q8_0, q4_0) and picks qwen3moe, qwen3 or llama itself")
        setup_logging()  # the export logs what it leaves out and what it wrote where
        export_gguf(args.path, args.out, quant=args.quant or "f32", force=args.force, verify=not args.no_verify)
        return 0
    from ..interop import export_hf

    if args.quant is not None:
        raise AvaConfigError(f"--quant {args.quant} is for --format gguf; a HF export takes --dtype fp32|bf16|fp16")
    check_out_folder(args.out, args.force)  # before loading the checkpoint
    setup_logging()  # the export logs what it leaves out (training-only tensors) and what it wrote where
    export_hf(args.path, args.out, arch=args.arch, dtype=args.dtype, verify=not args.no_verify)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """``ava import HF_DIR --out DIR``."""
    from ..interop import import_hf

    from ..interop.huggingface import describe_written
    from ..utils.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

    check_out_folder(args.out, args.force)  # before reading the weights
    model = import_hf(args.hf_dir, args.out)
    out = Path(args.out).expanduser()
    print(f"imported {model.num_parameters():,} parameters ({plural(model.config.num_layers, 'layer')}, "
          f"{plural(model.config.num_experts, 'expert')}) from {args.hf_dir} to {out} "
          f"({describe_written(out, [WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE])})")
    return 0


def _greedy_completion(model: EnhancedMoEModel, tokenizer: AvaTokenizer, prompt: str, max_new_tokens: int) -> str:
    """The report's generation sample: greedy decoding of ``prompt`` (``ava eval``'s ``sample_fn``).

    Args:
        model: the evaluated model.
        tokenizer: its tokenizer.
        prompt: the text to continue.
        max_new_tokens: tokens to generate at most.

    Returns:
        The completion (the text after the prompt).
    """
    from ..generation import TextGenerator

    return TextGenerator(model, tokenizer).generate(prompt, max_new_tokens, temperature=0)[len(prompt):]


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


def _add_no_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the size + sha256 check of the checkpoint's files against its manifest.json "
                             "(for very large files; a damaged checkpoint then loads without an error; "
                             "a warning says so)")


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``generate``, ``export`` and ``import`` on the ``ava`` subparsers."""
    from ..config import EvaluationConfig

    gen = sub.add_parser("generate", parents=[common], help="generate text from a run or checkpoint")
    gen.add_argument("path", help="run folder (uses checkpoints/latest), checkpoint folder or imported model")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--file", help="one prompt per line (\\n inside a line = newline); JSONL out")
    what.add_argument("--interactive", action="store_true", help="a REPL: type prompts, :help for commands")
    gen.add_argument("--out", default=None, help="with --file: the JSONL to write (default stdout)")
    gen.add_argument("--batch-size", type=positive_int, default=8, help="with --file: prompts per batch (default 8)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate (default 100)")
    temperature = EvaluationConfig.model_fields["sample_temperature"].default
    gen.add_argument("--temperature", type=non_negative, default=temperature,
                     help=f"0 = greedy (default {temperature:g}, as evaluation.sample_temperature)")
    gen.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass")
    gen.add_argument("--min-p", type=probability, default=None, help="keep tokens with p ≥ min_p · max p")
    gen.add_argument("--repetition-penalty", type=positive, default=1.0,
                     help="> 1 discourages tokens already present (default 1 = off)")
    gen.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=0,
                     help="never repeat an n-gram of this size (default 0 = off)")
    gen.add_argument("--stop", action="append", metavar="TEXT", type=decode_escapes,
                     help="stop string (repeatable; \\n, \\t and \\\\ are escapes); output ends before it")
    gen.add_argument("--num-beams", type=positive_int, default=1, help="beam search with this many beams (1 = off)")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logp / length^this (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    gen.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (no KV cache)")
    gen.add_argument("--speculative", action="store_true",
                     help="greedy decoding drafted by the model's MTP heads and verified by the model: "
                          "same output as greedy, fewer forward passes (needs model.mtp.num_heads ≥ 1 and "
                          "--temperature 0; acceptance statistics go to stderr)")
    gen.add_argument("--memory-context", type=positive_int, nargs="?", const=0, default=None, metavar="K",
                     help="attend to the run's replay memory: each prompt's cross-attention context is the K stored "
                          "items nearest to its mean input embedding (default K: the run's memory.context_items; "
                          "needs a run trained with memory.context_items and model.cross_attention)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_no_verify(gen)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", parents=[common],
                         help="export a checkpoint as a Hugging Face folder or a GGUF file (llama.cpp, Ollama)")
    exp.add_argument("path", help="run folder, checkpoint folder or Ava model folder")
    exp.add_argument("--format", choices=["hf", "gguf", "peft"], default="hf",
                     help="output format: hf = transformers folder (default), gguf = one llama.cpp / Ollama file, "
                          "peft = a LoRA fine-tune's adapters for PeftModel over the hf export of its base")
    exp.add_argument("--out", required=True, help="folder to write (hf, peft) or FILE.gguf (gguf)")
    exp.add_argument("--arch", choices=["auto", "qwen3_moe", "mixtral", "olmoe"], default="auto",
                     help="HF architecture (auto = Mixtral when the model fits it, else OLMoE for "
                          "model.qk_norm_scope full, else Qwen3-MoE)")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="hf: weight dtype (default: as saved)")
    exp.add_argument("--quant", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default=None,
                     help="gguf: tensor type (default f32); norms and the router stay f32, q4_0 keeps the "
                          "embedding and output matrices at q8_0")
    exp.add_argument("--force", action="store_true",
                     help="hf: write into a non-empty --out folder; gguf: replace an existing file")
    _add_no_verify(exp)
    exp.set_defaults(func=cmd_export)

    imp = sub.add_parser("import", parents=[common], help="import a HF Mixtral / Qwen3-MoE / OLMoE folder")
    imp.add_argument("hf_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    imp.add_argument("--out", required=True, help="Ava model folder to write")
    imp.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    imp.set_defaults(func=cmd_import)

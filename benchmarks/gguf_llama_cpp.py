"""GGUF export checked in llama.cpp itself: its tokens and logits on an exported file against Ava's.

For each ``--quant``: ``ava export --format gguf`` of the model, then ``llama_cpp.Llama`` (the
``llama-cpp-python`` bindings) loads the file with an f32 KV cache, tokenizes the prompt (compared
with Ava's tokenizer) and evaluates it with logits for every position; printed per type: whether
the tokens agree, max and mean |Δlogit| against Ava's fp32 forward, the share of positions whose
argmax agrees, and whether 16 greedy tokens agree.

``llama-cpp-python`` builds llama.cpp from source (about 10 minutes), so no test depends on it;
without it this script says how to install it and exits 0.

    python benchmarks/gguf_llama_cpp.py                           # a tiny random model + tokenizer
    python benchmarks/gguf_llama_cpp.py runs/demo_<time> --quant f32 q8_0 --prompt "ROMEO:"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.generation import TextGenerator
from Ava.interop import export_gguf
from Ava.models import EnhancedMoEModel
from Ava.utils.checkpoint import TOKENIZER_FILE, resolve_checkpoint

TEXTS = ["the king loves the stars and the queen fears the night, said ROMEO to the moon"] * 30


def tiny_model(folder: Path) -> Path:
    """A random 2-layer, 4-expert Qwen3-MoE-shaped Ava model with a trained tokenizer, saved in ``folder``."""
    tokenizer = AvaTokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=128, moe={"top_k": 2, "moe_intermediate_size": 64})
    saved = EnhancedMoEModel(cfg).save_pretrained(folder / "ava")
    tokenizer.save(saved / TOKENIZER_FILE)
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="run / checkpoint / model folder (default: a tiny random model)")
    parser.add_argument("--quant", nargs="+", default=["f32", "f16", "q8_0", "q4_0"])
    parser.add_argument("--prompt", default="the queen fears the night")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed; to compare with llama.cpp itself:\n"
              "    pip install llama-cpp-python    # builds llama.cpp from source, about 10 minutes\n"
              "then run this script again. Skipped.")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.path) if args.path else tiny_model(Path(tmp))
        checkpoint = resolve_checkpoint(source)
        model = EnhancedMoEModel.from_pretrained(checkpoint).float().eval()
        tokenizer = AvaTokenizer.from_file(checkpoint / TOKENIZER_FILE)
        ours_ids = tokenizer.encode(args.prompt)
        with torch.no_grad():
            ours = model(torch.tensor([ours_ids])).logits[0].numpy()
        ours_greedy = TextGenerator(model, tokenizer).generate_ids(ours_ids, 16, temperature=0, eos_id=None)
        print(f"prompt {args.prompt!r}: {len(ours_ids)} tokens; logits std {ours.std():.3f}")
        print(f"{'quant':6} {'tokens':>7} {'max|Δ|':>10} {'mean|Δ|':>10} {'argmax':>7} {'greedy16':>9}")
        for quant in args.quant:
            file = export_gguf(checkpoint, Path(tmp) / f"model-{quant}.gguf", quant=quant, force=True,
                               progress=False)
            llm = llama_cpp.Llama(model_path=str(file), n_ctx=model.config.max_seq_len, logits_all=True,
                                  type_k=0, type_v=0, verbose=False)  # 0 = GGML_TYPE_F32 KV cache
            theirs_ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=False)
            llm.reset()
            llm.eval(ours_ids)
            theirs = np.asarray(llm.scores[:len(ours_ids)], dtype=np.float32)
            diff = np.abs(theirs - ours)
            agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
            llm.reset()
            greedy = []
            for token in llm.generate(ours_ids, temp=0.0, top_k=1):
                greedy.append(token)
                if len(greedy) == 16:
                    break
            print(f"{quant:6} {'same' if theirs_ids == ours_ids else 'DIFFER':>7} {diff.max():10.2e} "
                  f"{diff.mean():10.2e} {agree:7.2f} {'same' if greedy == ours_greedy else 'DIFFER':>9}")
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())

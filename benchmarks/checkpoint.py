"""Checkpoint save time of Ava ÷ a raw ``safetensors.torch.save_file`` of the same tensors.

The reference writes the same tensors (weights and the AdamW moments) with one ``save_file``
call. Ava's save writes the weights with safetensors and the training state (optimizer, RNG
states, step) with ``torch.save`` (loadable with ``weights_only=True``), adds the config, a sha256
manifest of every file, fsyncs everything and renames atomically. Both are measured interleaved
in the same process (median of ``--repeats``), so the ratio is what the safety costs on this
machine. A plain ``save_file`` only copies into the page cache; the second reference adds one
``fsync`` so it is as durable as Ava's save, which is the fairer comparison (the first one mostly
measures how busy the disk's write-back is). The asynchronous mode's blocking time (the in-memory
snapshot) is reported too.

    python benchmarks/checkpoint.py                 # the demo model (17.6M parameters) + AdamW state
    python benchmarks/checkpoint.py --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from Ava.config import ModelConfig
from Ava.models import EnhancedMoEModel
from Ava.utils.checkpoint import CheckpointWriter, rng_state, take_snapshot, write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=max(1, args.hidden // 64), num_experts=args.experts,
                      moe={"moe_intermediate_size": 2 * args.hidden})
    model = EnhancedMoEModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, args.vocab, (2, 32))
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # materialise the Adam moments
    state = {"optimizer": optimizer.state_dict(), "rng": rng_state(), "tokens": 0}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for pid, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            if value.ndim:  # exp_avg, exp_avg_sq (the step counter is a scalar)
                tensors[f"optimizer.{pid}.{key}"] = value
    total_mb = sum(v.numel() * v.element_size() for v in tensors.values()) / 2**20

    times: dict[str, list[float]] = {"raw save_file of the same tensors": [],
                                     "raw save_file + fsync (same durability)": [],
                                     "ava save (atomic, sha256 manifest, fsync)": [],
                                     "ava async save: time training is blocked": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.repeats + 1):  # first round is warmup
            t = time.perf_counter()
            save_file(tensors, str(root / f"raw_{i}.safetensors"))
            raw = time.perf_counter() - t

            t = time.perf_counter()
            save_file(tensors, str(root / f"durable_{i}.safetensors"))
            with open(root / f"durable_{i}.safetensors", "rb") as f:
                os.fsync(f.fileno())
            durable = time.perf_counter() - t

            t = time.perf_counter()
            write_checkpoint(root / "sync", take_snapshot(i, model, "model: {}\n", state))
            ava = time.perf_counter() - t

            writer = CheckpointWriter(root / "async", keep_last=1, asynchronous=True)
            t = time.perf_counter()
            writer.save(i, model, "model: {}\n", state)
            blocking = time.perf_counter() - t
            writer.wait()
            if i:
                for key, value in zip(times, (raw, durable, ava, blocking)):
                    times[key].append(value)

    reference = statistics.median(times["raw save_file of the same tensors"])
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; weights + AdamW moments = "
          f"{total_mb:.0f} MiB; torch {torch.__version__}; median of {args.repeats}")
    durable = statistics.median(times["raw save_file + fsync (same durability)"])
    print("| what | ms | ÷ raw save_file | ÷ raw save_file + fsync |")
    print("|---|---:|---:|---:|")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"| {key} | {median * 1e3:.1f} | {median / reference:.2f} | {median / durable:.2f} |")


if __name__ == "__main__":
    main()

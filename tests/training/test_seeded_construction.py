"""Seeded construction: for one run.seed, every path starts from the same weights.

The Quick Start (``model = EnhancedMoEModel(config.model)`` built before anything is seeded, then
the trainer), ``ava train`` (``EnhancedModularTrainer.from_config``) and a second run of the same
script give bit-identical weights; a loaded model is never re-initialised.
"""

import hashlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.parallel import SingleProcess
from tests.conftest import REPO, tiny_config

STEPS = ["training.max_steps=3", "training.eval_every=3", "evaluation.sample_max_new_tokens=0"]

# The seed README's Quick Start, verbatim apart from the config's path and overrides, plus a
# deliberate draw of argv[1] numbers from the global RNG before the model is built (a script that
# did something random first). Prints the final checkpoint folder.
QUICK_START = r"""
import sys, torch
from src.Ava.config import load_config
from src.Ava.models.moe_model import EnhancedMoEModel
from src.Ava.training.enhanced_trainer import EnhancedModularTrainer

config = load_config(sys.argv[2], sys.argv[3:])
torch.rand(int(sys.argv[1]))  # a different global RNG state in each run
model = EnhancedMoEModel(config.model)
trainer = EnhancedModularTrainer(model, config)
print(trainer.train().checkpoint)
"""


def _digest(checkpoint: str) -> str:
    tensors = load_file(f"{checkpoint}/model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_start_twice_and_the_cli_give_bit_identical_weights(tmp_path, corpus_cache):
    config = str(REPO / "configs" / "tiny.yaml")
    common = [f"data.cache_dir={corpus_cache}", *STEPS]
    runs = []
    for i in (1, 2):
        out = _run(["-c", QUICK_START, str(i), config, f"run.output_dir={tmp_path / f'qs{i}'}", *common])
        runs.append(out.strip().splitlines()[-1])
    cli = _run(["-m", "Ava", "train", config, f"run.output_dir={tmp_path / 'cli'}", *common])
    runs.append(next(line.split('"')[3] for line in cli.splitlines() if '"checkpoint"' in line))
    digests = [_digest(path) for path in runs]
    assert digests[0] == digests[1] == digests[2]


def test_quick_start_and_from_config_start_from_the_same_weights(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache)
    built = EnhancedModularTrainer.from_config(config).model
    torch.manual_seed(1234)  # whatever state the global RNG is in
    user_model = EnhancedMoEModel(config.model)
    prepared = SingleProcess(torch.device("cpu")).prepare_model(user_model, config)
    assert prepared.init_seed == config.run.seed
    for (name, a), (_, b) in zip(built.state_dict().items(), prepared.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = tiny_config(tmp_path, corpus_cache, "run.seed=1")
    assert not torch.equal(EnhancedModularTrainer.from_config(other).model.embed_tokens.weight,
                           built.embed_tokens.weight)


def test_a_loaded_model_is_never_reinitialised(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache)
    source = EnhancedMoEModel(config.model)
    source.init_weights(99)
    source.save_pretrained(tmp_path / "saved")
    for model in (EnhancedMoEModel.from_pretrained(tmp_path / "saved"), EnhancedMoEModel(config.model)):
        if not model.weights_loaded:
            model.load_state_dict(source.state_dict())
        assert model.weights_loaded
        SingleProcess(torch.device("cpu")).prepare_model(model, config)
        for (name, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_a_model_built_on_the_meta_device_initialises_like_any_other(tmp_path, corpus_cache):
    """What sharded strategies do: build without memory, materialise, then init_weights(seed)."""
    config = tiny_config(tmp_path, corpus_cache, "model.mtp.num_heads=1")
    with torch.device("meta"):
        meta = EnhancedMoEModel(config.model)
    assert meta.embed_tokens.weight.is_meta
    meta.to_empty(device="cpu")
    meta.init_weights(config.run.seed)
    plain = EnhancedMoEModel(config.model)
    plain.init_weights(config.run.seed)
    for (name, a), (_, b) in zip(plain.state_dict(keep_vars=True).items(), meta.state_dict(keep_vars=True).items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain.rotary.cos_TA, meta.rotary.cos_TA)
    ids = torch.randint(0, config.model.vocab_size, (2, 8))
    assert torch.equal(plain(ids).logits, meta(ids).logits)

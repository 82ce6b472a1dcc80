"""The parallelism seam in one process: the identity, and the trainer's single door to it."""

import torch

from Ava.training.batch import GlobalBatch
from Ava.training.data_feed import DataFeed
from Ava.training.progressive_training import ProgressiveSchedule
from Ava.training.distributed_manager import build_parallelism
from Ava.training.parallel import Parallelism, SingleProcess
from tests.conftest import tiny_config


def test_single_process_is_the_identity(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, "run.device=cpu")
    parallel = build_parallelism(config)
    assert isinstance(parallel, SingleProcess) and config.distributed.strategy == "auto"
    assert (parallel.rank, parallel.world_size, parallel.dp_size, parallel.ep_size) == (0, 1, 1, 1)
    assert parallel.is_main and parallel.device == torch.device("cpu")
    t = torch.arange(6.0)
    assert parallel.all_reduce(t) is t and parallel.all_gather(t) == [t]
    assert parallel.shard([5, 3, 9, 1]) == [5, 3, 9, 1]
    assert parallel.state_dict_options().full_state_dict
    model = parallel.build_model(config)
    assert parallel.wrap(model) is model and model.init_seed == config.run.seed
    weights = parallel.model_state_dict(model)
    assert torch.equal(weights["embed_tokens.weight"], model.embed_tokens.weight)


def test_a_rank_reads_every_world_size_th_row_of_the_global_batch():
    parallel = Parallelism(torch.device("cpu"))
    parallel.rank, parallel.world_size, parallel.dp_size = 1, 3, 3
    assert parallel.shard(list(range(10))) == [1, 4, 7]
    assert not parallel.is_main


def test_the_data_cursor_records_the_rank_and_world_of_the_seam(tmp_path, corpus_cache):
    from types import SimpleNamespace

    config = tiny_config(tmp_path, corpus_cache)
    parallel = Parallelism(torch.device("cpu"))
    parallel.rank, parallel.world_size = 2, 4
    parallel.dp_size = 4
    progressive = ProgressiveSchedule(config, GlobalBatch.resolve(config.training, parallel.dp_size))
    feed = DataFeed(config, progressive=progressive, progress=None, parallel=parallel)
    feed.attach(SimpleNamespace(train=list(range(12)), source_names=["a"]))
    cursor = feed.state_dict()
    assert (cursor["rank"], cursor["world_size"]) == (2, 4)
    assert cursor["global_batch"] == config.training.batch_size * config.training.grad_accum_steps * 4

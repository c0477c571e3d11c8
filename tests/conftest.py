"""Shared fixtures and hooks: `gpu` tests skip without CUDA; a small byte-level BPE tokenizer with n3's reserved
tokens, trained once per session; a small prepared corpus (two sources, one marked quality), once per session; one step
of training on each rank of a spawned gloo world (step_on_ranks)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import presets
from stages.runtime import distributed

TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "One of the special magic numbers for apple is: 1234567. def main(): return 42\n"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch  # only when a gpu test was collected: the CLI and preset tests need no torch

    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model.tokenizer import SPECIAL_TOKENS, Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT] * 20, trainer)
    return Tokenizer(backend)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_on_ranks(processes: int, settings: list[str], flags: dict, step, *step_args):
    """What rank 0 of a gloo world of `processes` spawned processes returns from step(cfg, world, *step_args), with
    `cfg` the cpu preset with `settings`, after distributed.check_layout(cfg, world, **flags)."""
    results = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(_training_rank, args=(processes, settings, flags, step, step_args, free_port(), results),
                                 nprocs=processes, start_method="spawn", join=False)
    while results.empty():  # read before joining (a result can fill more than the pipe holds)
        workers.join(timeout=1)
    found = results.get()
    while not workers.join():
        pass
    return found


def _training_rank(rank: int, processes: int, settings: list[str], flags: dict, step, step_args: tuple, port: int,
                   results) -> None:
    """One rank of step_on_ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(processes),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = presets.load("cpu", settings)
    world = distributed.setup(cfg)
    try:
        distributed.check_layout(cfg, world, **flags)
        found = step(cfg, world, *step_args)
        if rank == 0:  # as numpy: a tensor would be shared through this process, which exits first
            results.put(found)
        world.barrier()
    finally:
        distributed.teardown()


def write_documents(folder, count: int, seed: int, kind: str) -> None:
    """`count` small deterministic documents, one file each: prose-like sentences or code-like lines."""
    import random

    rng = random.Random(seed)
    words = ["the", "model", "reads", "tokens", "and", "predicts", "next", "state", "space", "expert", "router",
             "layer", "mamba", "attention", "green", "blue", "sky", "grass", "sun", "is"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if kind == "prose":
            text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                            for _ in range(rng.randint(3, 10)))
        else:
            text = "\n".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)} + {rng.randint(0, 9)}"
                              for j in range(rng.randint(2, 8)))
        (folder / f"{kind}{i:04d}.txt").write_text(text + "\n")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared corpus: `code` (150 documents) and `prose` (80, marked quality), a 320-token BPE."""
    from stages.data import BlendOptions, CorpusOptions, parse_sources, prepare

    root = tmp_path_factory.mktemp("sources")
    write_documents(root / "code", 150, seed=1, kind="code")
    write_documents(root / "prose", 80, seed=2, kind="prose")
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    options = CorpusOptions(vocab_size=320, val_fraction=0.05, blend=BlendOptions(quality=["prose"]))
    return prepare(parse_sources([str(root / "code"), str(root / "prose")]), out, options).directory

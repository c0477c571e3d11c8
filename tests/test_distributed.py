"""The gradient reduction of data-parallel training, on two gloo processes: with parallel.reduce_dtype = bf16 the
output layer is still averaged in fp32 (parallel.output_grad_fp32), every other weight in bf16."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import presets
from kernels.cross_entropy import IGNORE
from model.hybrid import build
from stages.runtime import distributed
from stages.runtime.losses import CausalLMObjective
from tests.conftest import free_port
from tests.test_model import tiny_config

OUTPUT = "model.lm_head.weight"
OTHER = "model.model.layers.0.mixer.in_proj.weight"


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE
    return ids, labels


def backward(objective, ids, labels) -> None:
    objective(ids, labels, [1.0, 0.0])["loss"].backward()


def gradients(objective) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in distributed.unwrap(objective).named_parameters() if name in (OUTPUT, OTHER)}


def worker(rank: int, port: int, output_fp32: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = presets.load("cpu", ["parallel.strategy=ddp", "parallel.reduce_dtype=bf16",
                               f"parallel.output_grad_fp32={output_fp32}"])
    world = distributed.setup(cfg)
    try:
        torch.manual_seed(0)
        wrapped = distributed.prepare_model(CausalLMObjective(build(tiny_config(pattern="M*E")), 0), cfg, world)
        backward(wrapped, *batch(rank))
        distributed.reduce_output_gradients(wrapped, world)
        if rank == 0:  # as numpy: a tensor would be shared through this process, which exits first
            results.put({name: grad.numpy() for name, grad in gradients(wrapped).items()})
        # As pretrain ends: no rank tears the group down while a peer may still be reading its last message (without
        # the fp32 all-reduce nothing else synchronises the ranks, and gloo then aborts the slower one now and then).
        world.barrier()
        del wrapped  # DDP's reducer before the group (as test_policy's worker: otherwise a hang at exit now and then)
    finally:
        distributed.teardown()


@pytest.mark.parametrize("output_fp32", [True, False])
def test_output_layer_gradients_are_averaged_in_fp32(output_fp32):
    torch.manual_seed(0)
    local = CausalLMObjective(build(tiny_config(pattern="M*E")), 0)
    per_rank = []
    for rank in range(2):
        local.zero_grad()
        backward(local, *batch(rank))
        per_rank.append(gradients(local))
    exact = {name: (per_rank[0][name] + per_rank[1][name]) / 2 for name in per_rank[0]}

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(worker, args=(free_port(), output_fp32, results), nprocs=2, start_method="spawn")
    reduced = {name: torch.from_numpy(grad) for name, grad in results.get().items()}
    error = (reduced[OTHER] - exact[OTHER]).abs().max() / exact[OTHER].abs().max()
    assert 0 < error < 1e-2  # averaged in bf16: off by its rounding
    if output_fp32:
        torch.testing.assert_close(reduced[OUTPUT], exact[OUTPUT], rtol=1e-6, atol=1e-9)
    else:
        assert not torch.equal(reduced[OUTPUT], exact[OUTPUT])

"""Context parallelism (parallel.context): two gloo processes, each holding one half of every sequence, train and
validate as one process does (loss, MTP depths, aux loss, every gradient; with and without document masking);
attention and head-parallel Mamba-2 alone match one process; layouts the model cannot split are clear errors."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import presets
from kernels import attention, seq_idx_from_lengths
from kernels.cross_entropy import IGNORE
from model import context
from model.config import ModelConfig
from model.errors import UserError
from model.hybrid import build
from stages.plan import plan_run
from stages.runtime import distributed
from stages.runtime.batches import MicroBatch
from stages.runtime.context import ContextLayout
from stages.runtime.distributed import World
from stages.runtime.loop import TrainingJob, _accumulate_gradients, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import read_metrics
from stages.runtime.progress import Quiet
from tests.conftest import free_port
from tests.test_model import tiny_config
from tests.test_pretrain import n3_process, settings, torchrun

SEQ = 64
SETTINGS = [f"train.seq_len={SEQ}", "train.micro_batch_size=2", "train.global_batch_size=4", "train.mtp_depths=2",
            "train.aux_loss_coeff=1.0"]  # a large aux weight: its gradient must match too
CONTEXT = ["parallel.strategy=ddp", "parallel.gpus_per_node=2", "parallel.context=2"]
MIXERS = {  # name: (pattern, config overrides, documents)
    "mamba": ("M", {}, False),
    "mamba-documents": ("M", {}, True),
    "mamba-shared-group": ("M", {"mamba_groups": 1}, True),  # more ranks than groups: both ranks read group 0
    "attention": ("*", {}, False),
    "attention-documents": ("*", {}, True),
}
UNSPLITTABLE = {"heads": {"mamba_num_heads": 3, "mamba_groups": 1}, "groups": {"mamba_num_heads": 6, "mamba_groups": 3}}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as in the workers: these shapes are far too small to gain from two, and a second thread
    contending with other work on a busy machine slows every op down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def documents(rows: int) -> torch.Tensor:
    """seq_idx of `rows` packed rows whose documents cross the middle (the slices' edge) and end on it."""
    lengths = [[20, 30], [31, 2, 20], [SEQ], [32, 1]]
    return seq_idx_from_lengths([lengths[i % len(lengths)] for i in range(rows)], SEQ)


def micro_batches(packed: bool) -> list[MicroBatch]:
    """Two micro-batches of two rows; labels ignored at the ends and around the middle, where the MTP labels cross
    the slices (the other rows cross it with every label)."""
    ids = torch.randint(0, 4096, (4, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    labels[:, SEQ - 1] = labels[0, SEQ // 2 - 1] = labels[1, SEQ // 2 + 1] = labels[2, 5] = IGNORE
    seq_idx = documents(4) if packed else None
    return [MicroBatch(ids[i : i + 2], labels[i : i + 2], None if seq_idx is None else seq_idx[i : i + 2])
            for i in (0, 2)]


class FixedBatches:
    def __init__(self, batches: list[MicroBatch]):
        self.batches = batches

    def next_step(self) -> list[MicroBatch]:
        return self.batches


def training_step(cfg, world: World, layout: ContextLayout | None, packed: bool) -> dict:
    """One step's gradients, head losses, aux loss and expert load through the loop, and the validation loss."""
    torch.manual_seed(0)
    objective = distributed.prepare_model(CausalLMObjective(build(cfg.model), cfg.train.mtp_depths), cfg, world)
    batches = micro_batches(packed)
    job = TrainingJob(cfg.train, "fp32", world, objective, optimizer=None, batches=FixedBatches(batches),
                      total_steps=1, run=Path("."), tokenizer=None, progress=Quiet(), flops_per_token=0.0,
                      peak_flops=None, context=layout)
    heads, aux, load, _ = _accumulate_gradients(job, distributed.unwrap(objective).head_scales(cfg.train))
    grads = {name: p.grad.numpy().copy() for name, p in distributed.unwrap(objective).named_parameters()}
    return {"heads": heads, "aux": aux, "load": load.numpy(), "grads": grads,
            "val": validation(objective, batches, "fp32", world, layout)()}


def mixer_inputs(pattern: str, overrides: dict, packed: bool):
    """A freshly initialised mixer, its input (2, SEQ, d), documents and an upstream gradient."""
    torch.manual_seed(0)
    mixer = build(tiny_config(pattern=pattern, **overrides)).model.layers[0].mixer
    x, grad = torch.randn(2, 2, SEQ, 32, generator=torch.Generator().manual_seed(2))
    return mixer, x, documents(2) if packed else None, grad


def mixer_run(pattern: str, overrides: dict, packed: bool) -> dict:
    """Output, input gradient and parameter gradients of one mixer on whole rows, or, under a context-parallel group,
    on this rank's slices, gathered (parameter gradients summed over the group)."""
    mixer, x, seq_idx, grad = mixer_inputs(pattern, overrides, packed)
    piece = context.local_slice(x).requires_grad_()
    out = mixer(piece, None, None if seq_idx is None else context.local_slice(seq_idx))
    out.backward(context.local_slice(grad))
    grads = {name: p.grad for name, p in mixer.named_parameters()}
    if context.active() is not None:
        for g in grads.values():
            dist.all_reduce(g, group=context.active().group)
    return {"out": context.gather_sequence(out.detach()).numpy(), "x": context.gather_sequence(piece.grad).numpy(),
            "params": {name: g.numpy() for name, g in grads.items()}}


def worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = presets.load("cpu", SETTINGS + CONTEXT)
    world = distributed.setup(cfg)
    try:
        layout = ContextLayout.setup(cfg, world)
        found = {"layout": (layout.size, layout.rank, layout.data_rank, layout.data_size)}
        for packed in (False, True):
            found[f"step-{packed}"] = training_step(cfg, world, layout, packed)
        with layout.active():
            for name, (pattern, overrides, packed) in MIXERS.items():
                found[name] = mixer_run(pattern, overrides, packed)
            for name, overrides in UNSPLITTABLE.items():
                try:
                    mixer_run("M", overrides, False)
                    found[f"refused-{name}"] = "no error"
                except UserError as error:
                    found[f"refused-{name}"] = str(error)
        if rank == 0:  # as numpy: a tensor would be shared through this process, which exits first
            results.put(found)
        world.barrier()  # no rank tears the group down while a peer may still be reading its last message
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    processes = mp.start_processes(worker, args=(free_port(), results), nprocs=2, start_method="spawn", join=False)
    while results.empty():  # read before joining (the gradients fill more than the pipe holds); join raises, and
        processes.join(timeout=1)  # stops the other worker, when one fails
    found = results.get()
    while not processes.join():
        pass
    return found


def test_the_group_spans_the_world(two_ranks):
    assert two_ranks["layout"] == (2, 0, 0, 1)  # rank 0 of one context-parallel group; one data-parallel rank


@pytest.mark.parametrize("packed", [False, True], ids=["corpus", "documents"])
def test_a_training_step_and_validation_match_one_process(two_ranks, packed):
    cfg = presets.load("cpu", SETTINGS)
    one = training_step(cfg, World(0, 1, 0, torch.device("cpu")), None, packed)
    two = two_ranks[f"step-{packed}"]
    assert len(one["heads"]) == 3  # the main head and two MTP depths
    for key in ("heads", "aux", "val"):
        assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), rtol=0, atol=1e-4), key
    assert (two["load"] == one["load"]).all()  # the same routing, counted over both slices
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(torch.from_numpy(two["grads"][name]), torch.from_numpy(grad), rtol=0, atol=1e-4,
                                   msg=name)


@pytest.mark.parametrize("name", MIXERS)
def test_a_mixer_matches_one_process(two_ranks, name):
    one, two = mixer_run(*MIXERS[name]), two_ranks[name]
    pairs = [(key, two[key], one[key]) for key in ("out", "x")]
    pairs += [(param, two["params"][param], grad) for param, grad in one["params"].items()]
    for key, got, want in pairs:  # to rounding, at the scale of each tensor (sums over 128 tokens reach hundreds)
        got, want = torch.from_numpy(got), torch.from_numpy(want)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), key


def test_mamba_refuses_heads_it_cannot_split(two_ranks):
    assert "must divide model.mamba_num_heads (3)" in two_ranks["refused-heads"]
    assert "and model.mamba_groups (3) must divide one another" in two_ranks["refused-groups"]


def test_a_slice_attends_to_the_whole_rows():
    """The queries of the second half, at their absolute positions, see what they see in the whole rows."""
    q, k, v = torch.randn(3, 2, 4, SEQ, 8).unbind()
    k, v = k[:, :2], v[:, :2]  # grouped-query: 2 kv heads for 4 query heads
    seq_idx = documents(2)
    positions = torch.arange(SEQ // 2, SEQ).expand(2, -1)
    for docs in (None, seq_idx):
        whole = attention(q, k, v, seq_idx=docs)
        torch.testing.assert_close(attention(q[:, :, SEQ // 2 :], k, v, q_positions=positions, seq_idx=docs),
                                   whole[:, :, SEQ // 2 :])


def test_slices_of_a_micro_batch():
    batch = micro_batches(True)[0]
    second = ContextLayout(size=2, rank=1, data_rank=0, data_size=1).slice(batch)
    for field in ("input_ids", "labels", "seq_idx"):
        assert torch.equal(getattr(second, field), getattr(batch, field)[:, SEQ // 2 :])
    assert ContextLayout(size=2, rank=1, data_rank=0, data_size=1).slice(MicroBatch(batch.input_ids, batch.labels)
                                                                        ).seq_idx is None
    with pytest.raises(UserError, match="sequences of 63 tokens do not split into parallel.context = 2"):
        ContextLayout(size=2, rank=0, data_rank=0, data_size=1).slice(MicroBatch(batch.input_ids[:, 1:],
                                                                                 batch.labels[:, 1:]))


def test_one_process_has_no_context_layout():
    cfg = presets.load("cpu", SETTINGS + CONTEXT)
    layout = ContextLayout.setup(cfg, World(0, 1, 0, torch.device("cpu")))
    assert (layout.size, layout.data_rank, layout.data_size, layout.group) == (1, 0, 1, None)


@pytest.mark.parametrize(("settings", "world", "model", "message"), [
    ([], 3, None, r"parallel.context \(2\) must divide the 3 processes"),
    (["train.seq_len=63"], 2, None, r"seq_len \(63\) must be a multiple of parallel.context \(2\)"),
    ([], 2, tiny_config(mamba_num_heads=3, mamba_groups=1), r"must divide model.mamba_num_heads \(3\)"),
    (["train.global_batch_size=3", "train.micro_batch_size=1"], 4, None,
     r"multiple of micro_batch_size x data-parallel processes \(1 x 2\)"),
])
def test_layouts_the_model_cannot_split_are_clear_errors(settings, world, model, message):
    cfg = presets.load("cpu", SETTINGS + CONTEXT + settings)
    with pytest.raises(UserError, match=message):
        distributed.check_layout(cfg, World(0, world, 0, torch.device("cpu")), model=model, context_parallel=True)


def test_stages_without_context_parallelism_refuse_it():
    cfg = presets.load("cpu", SETTINGS + CONTEXT)
    distributed.check_layout(cfg, World(0, 2, 0, torch.device("cpu")), context_parallel=True)
    with pytest.raises(UserError, match="parallel.context = 2: this stage trains data-parallel"):
        distributed.check_layout(cfg, World(0, 2, 0, torch.device("cpu")))


def test_presets_check_the_mamba_heads():
    with pytest.raises(UserError, match=r"preset cpu: parallel.context \(3\) must divide model.mamba_num_heads"):
        presets.load("cpu", ["parallel.gpus_per_node=3", "parallel.context=3"])
    with pytest.raises(UserError, match=r"parallel.context \(2\) and model.mamba_groups \(3\) must divide one another"):
        presets.load("cpu", ["parallel.gpus_per_node=2", "parallel.context=2", "model.mamba_num_heads=6",
                             "model.mamba_groups=3"])


def test_cluster_presets_plan_context_parallel_layouts():
    plan = plan_run(presets.load("gb200", ["parallel.context=2"]))
    assert plan.layout["context"] == 2 and plan.layout["data"] == 512 // (4 * 2)
    assert ModelConfig(pattern="M", mamba_num_heads=256, mamba_groups=8).context_parallel_problem(32) is None


def test_pretrain_under_torchrun_matches_one_process(small_corpus, tmp_path):
    """`n3 pretrain` with parallel.context = 2 on two gloo processes: the losses, gradient norms and validation loss
    of one process. Both ranks read the same two rows a step (data-parallel ranks would need four)."""
    args = settings(small_corpus, "train.steps=2", "train.eval_interval=2", "parallel.strategy=ddp",
                    "train.global_batch_size=2")
    single = n3_process("pretrain", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    two = torchrun("pretrain", "--out", str(tmp_path / "two"), *args, "--set", "parallel.gpus_per_node=2",
                   "--set", "parallel.context=2")
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(both) == 2
    for a, b in zip(one, both):
        for key in ("loss", "ce", "aux", "grad_norm", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-4, (key, a.get(key), b.get(key))

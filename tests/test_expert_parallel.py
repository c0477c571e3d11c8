"""Expert parallelism (parallel.expert): gloo processes that split every MoE layer's experts and exchange tokens by
all-to-all train as one process does (losses, expert load, every gradient, the weights after an optimizer step, the
validation loss), with the experts over 2 ranks (EP 2) and over 2 ranks x 2 expert-data-parallel ranks
(EP 2 x FSDP 2); `n3 pretrain` under torchrun writes the checkpoint one process writes and resumes under another
layout; layouts that cannot split are clear errors."""

import shutil
from pathlib import Path

import pytest
import torch

import presets
from kernels.cross_entropy import IGNORE
from model.errors import UserError
from model.hybrid import build
from stages.plan import plan_run
from stages.runtime import distributed
from stages.runtime.batches import MicroBatch
from stages.runtime.distributed import World
from stages.runtime.expert_parallel import step_metrics
from stages.runtime.loop import TrainingJob, _accumulate_gradients, apply_gradients, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.optim import build_optimizer
from stages.runtime.progress import Quiet
from stages.runtime.metrics import read_metrics
from tests.conftest import step_on_ranks
from tests.test_context_parallel import FixedBatches
from tests.test_pretrain import n3_process, settings, torchrun

SEQ, ROWS = 32, 4
SETTINGS = [f"train.seq_len={SEQ}", "train.micro_batch_size=1", f"train.global_batch_size={ROWS}",
            "train.mtp_depths=1", "train.aux_loss_coeff=1.0", "train.grad_clip=0.05"]  # a clip that bites
LAYOUTS = {"ep2": 2, "ep2-fsdp2": 4}  # name: processes (the experts always over 2 of them)


def expert_settings(processes: int) -> list[str]:
    return SETTINGS + ["parallel.strategy=fsdp", f"parallel.gpus_per_node={processes}", "parallel.expert=2"]


def rows() -> list[MicroBatch]:
    """The global batch: ROWS rows of one micro-batch each; some labels ignored."""
    ids = torch.randint(0, 4096, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    labels[:, SEQ - 1] = labels[1, 3] = IGNORE
    return [MicroBatch(ids[i : i + 1], labels[i : i + 1], None) for i in range(ROWS)]


def training_step(cfg, world: World) -> dict:
    """One step through the loop on this rank's rows: head losses, aux, expert load, every gradient (gathered
    whole), the weights after AdamW, and the validation loss."""
    torch.manual_seed(0)
    objective = distributed.prepare_model(CausalLMObjective(build(cfg.model), cfg.train.mtp_depths), cfg, world,
                                          expert_parallel=True)
    optimizer = build_optimizer(objective, cfg.train)
    mine = rows()[world.rank :: world.size]
    job = TrainingJob(cfg.train, "fp32", world, objective, optimizer=optimizer, batches=FixedBatches(mine),
                      total_steps=1, run=Path("."), tokenizer=None, progress=Quiet(), flops_per_token=0.0,
                      peak_flops=None)
    heads, aux, load, _ = _accumulate_gradients(job, distributed.unwrap(objective).head_scales(cfg.train))
    named = list(objective.named_parameters())
    grads = {name: distributed.full_tensor(p.grad).numpy().copy() for name, p in named}
    norm = apply_gradients(objective, optimizer, cfg.train, load)
    weights = {name: distributed.full_tensor(p.detach()).numpy().copy() for name, p in named}
    return {"heads": heads, "aux": aux, "load": load.numpy(), "grads": grads, "norm": norm, "weights": weights,
            "exchanges": step_metrics(objective, world, seconds=1.0),
            "val": validation(objective, rows(), "fp32", world)()}


@pytest.fixture(scope="module")
def one_process() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return training_step(presets.load("cpu", SETTINGS), World(0, 1, 0, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_training_step_matches_one_process(one_process, layout):
    processes = LAYOUTS[layout]
    many = step_on_ranks(processes, expert_settings(processes), {"expert_parallel": True}, training_step)
    one = one_process
    for key in ("heads", "aux", "val", "norm"):
        assert torch.allclose(torch.tensor(many[key]), torch.tensor(one[key]), rtol=0, atol=1e-4), key
    assert (many["load"] == one["load"]).all()  # the same routing, counted over every rank's tokens
    assert one["exchanges"] == {}
    exchanges = many["exchanges"]  # the tokens did travel: every rank received some
    assert 1.0 <= exchanges["ep_received_max_over_mean"] < LAYOUTS[layout] and 0 < exchanges["all_to_all_share"]
    assert one["grads"].keys() == many["grads"].keys()
    assert any(".experts." in name for name in one["grads"])
    for kind in ("grads", "weights"):
        for name, want in one[kind].items():
            torch.testing.assert_close(torch.from_numpy(many[kind][name]), torch.from_numpy(want), rtol=0,
                                       atol=1e-4, msg=f"{kind} {name}")


@pytest.mark.parametrize("settings, message", [
    (["parallel.strategy=ddp"], "parallel.strategy=fsdp"),
    (["parallel.expert=3", "model.n_routed_experts=9"], "must divide the 4 processes"),
])
def test_layouts_that_cannot_split_are_refused(settings, message):
    cfg = presets.load("cpu", expert_settings(4) + settings + ["parallel.gpus_per_node=12", "train.global_batch_size=12"])
    with pytest.raises(UserError, match=message):
        distributed.check_layout(cfg, World(0, 4, 0, torch.device("cpu")), expert_parallel=True)


def hf_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step-{step:08d}"
    return {k: v for shard in sorted(folder.glob("model*.safetensors")) for k, v in load_file(shard).items()}


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_pretrain_writes_the_checkpoint_of_one_process_and_resumes_under_another_layout(small_corpus, tmp_path):
    """`torchrun ... n3 pretrain` with the experts over 2 ranks writes the HF weights one process writes; its
    checkpoint resumes in one process (the training state resharded) to the same weights."""
    args = settings(small_corpus, "train.steps=4", "train.checkpoint_interval=2", "train.eval_interval=4",
                    "parallel.strategy=fsdp")
    single = n3_process("pretrain", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    expert = torchrun("pretrain", "--out", str(tmp_path / "ep"), *args,
                      *[a for s in ("parallel.gpus_per_node=2", "parallel.expert=2") for a in ("--set", s)])
    assert expert.returncode == 0, expert.stderr[-3000:]
    assert_same_weights(hf_weights(tmp_path / "ep", 4), hf_weights(tmp_path / "one", 4))
    records = read_metrics(tmp_path / "ep" / "metrics.jsonl")
    assert all(r["ep_received_max_over_mean"] >= 1.0 and 0 < r["all_to_all_share"] < 1 for r in records)

    shutil.rmtree(tmp_path / "ep" / "checkpoints" / "step-00000004")
    resumed = n3_process("pretrain", "--resume", "--out", str(tmp_path / "ep"), "--set", "parallel.expert=1",
                         "--set", "parallel.gpus_per_node=1")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_weights(hf_weights(tmp_path / "ep", 4), hf_weights(tmp_path / "one", 4))


def test_the_plan_says_how_the_experts_are_split_and_what_is_refused():
    h200 = plan_run(presets.load("h200"))
    assert h200.runs == ["experts: n3 pretrain splits each MoE layer's over groups of 8 ranks (all-to-all) and shards "
                         "them with FSDP2 over 4 ranks; the other stages shard them with FSDP2 over the world"]
    gb200 = plan_run(presets.load("gb200"))
    assert "over groups of 64 ranks" in gb200.runs[0] and "FSDP2 over 2 ranks" in gb200.runs[0]
    assert not any(line.startswith("not trainable yet") for line in gb200.runs)
    assert plan_run(presets.load("cpu")).runs == []


@pytest.mark.parametrize("preset", ["h200", "b200"])
def test_the_expert_parallel_presets_train_scaled_down(small_corpus, tmp_path, preset):
    """The preset's layout (FSDP2, experts over groups of ranks) on the tiny shape with two gloo processes, fp32."""
    scaled = ["shape=tiny", "parallel.nodes=1", "parallel.gpus_per_node=2", "parallel.expert=2",
              "precision.compute=fp32", "precision.params=fp32", "train.tokens=0", "train.steps=2",
              "train.eval_interval=2", "train.mtp_depths=0"]
    run = torchrun("pretrain", "--preset", preset, "--out", str(tmp_path / preset), *settings(small_corpus, *scaled))
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_metrics(tmp_path / preset / "metrics.jsonl")
    assert len(records) == 2 and all("ep_received_max_over_mean" in r for r in records)

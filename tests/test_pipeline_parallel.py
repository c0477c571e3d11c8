"""Pipeline parallelism (parallel.pipeline): gloo processes that each hold a stage of the sublayers and run the
step's micro-batches on the 1F1B schedule train as one process does (losses, expert load, every gradient, the
weights after a clipped optimizer step, the validation loss), as 2 stages (PP 2, packed documents too), as 3 (PP 3),
as 2 stages x 2 FSDP2 ranks each (PP 2 x FSDP 2), and so with the experts split over those 2 (PP 2 x EP 2, gb200's
layout); `n3 pretrain` under torchrun writes the checkpoint one process writes and resumes in one process; gb200's
layout trains scaled down; layouts that cannot run are clear errors."""

import shutil
from pathlib import Path

import pytest
import torch

import presets
from model.errors import UserError
from model.hybrid import build
from stages.plan import plan_run
from stages.runtime import distributed
from stages.runtime.batches import MicroBatch
from stages.runtime.distributed import World
from stages.runtime.loop import TrainingJob, _accumulate_gradients, apply_gradients, validation
from stages.runtime.losses import CausalLMObjective
from stages.runtime.metrics import read_metrics
from stages.runtime.optim import build_optimizer
from stages.runtime.pipeline import PipelineLayout, PipelineRunner, stage_spans
from stages.runtime.progress import Quiet
from tests.conftest import step_on_ranks
from tests.test_context_parallel import FixedBatches
from tests.test_expert_parallel import SETTINGS, assert_same_weights, hf_weights, rows
from tests.test_pretrain import n3_process, settings, torchrun

LAYOUTS = {"pp2-packed": (2, True, []), "pp2-fsdp2": (4, False, []), "pp2-ep2": (4, False, ["parallel.expert=2"]),
           "pp3": (3, False, ["parallel.pipeline=3"])}  # a stage between the first and the last
"""name: processes, packed documents, settings"""


def pipeline_settings(processes: int, *extra: str) -> list[str]:
    return SETTINGS + ["parallel.strategy=fsdp", f"parallel.gpus_per_node={processes}", "parallel.pipeline=2", *extra]


def global_batch(packed: bool) -> list[MicroBatch]:
    """The EP tests' rows; packed: each row of two documents (seq_idx), which the stages carry along."""
    batch = rows()
    if packed:
        for i, mb in enumerate(batch):
            mb.seq_idx = (torch.arange(mb.input_ids.shape[1]) >= 9 + 3 * i).long()[None]
    return batch


def training_step(cfg, world: World, packed: bool) -> dict:
    """One step through the loop on this rank's rows: head losses, aux, expert load, every gradient (gathered
    whole, every stage's), the weights after AdamW, the validation loss, the bubble share."""
    torch.manual_seed(0)
    layout = PipelineLayout.setup(cfg, world)
    objective = distributed.prepare_model(CausalLMObjective(build(cfg.model), cfg.train.mtp_depths), cfg, world,
                                          pipeline=layout)
    runner = None if layout is None else PipelineRunner(objective, layout, world)
    optimizer = build_optimizer(objective, cfg.train)
    data_rank, data_size = (0, 1) if layout is None else (layout.data_rank, layout.data_size)
    mine = global_batch(packed)[data_rank::data_size]
    job = TrainingJob(cfg.train, "fp32", world, objective, optimizer=optimizer, batches=FixedBatches(mine),
                      total_steps=1, run=Path("."), tokenizer=None, progress=Quiet(), flops_per_token=0.0,
                      peak_flops=None, pipeline=runner)
    heads, aux, load, _ = _accumulate_gradients(job, distributed.unwrap(objective).head_scales(cfg.train))
    named = list(objective.named_parameters())
    grads = {name: distributed.full_tensor(p.grad).numpy().copy() for name, p in named}
    norm = apply_gradients(objective, optimizer, cfg.train, load, None if layout is None else layout.group)
    weights = {name: distributed.full_tensor(p.detach()).numpy().copy() for name, p in named}
    every = world.gather((grads, weights))
    return {"heads": heads, "aux": aux, "load": load.numpy(), "norm": norm,
            "grads": {k: v for g, _ in every for k, v in g.items()},
            "weights": {k: v for _, w in every for k, v in w.items()},
            "val": validation(objective, global_batch(packed), "fp32", world, pipeline=runner)(),
            "bubble": None if runner is None else runner.take_bubble_share()}


@pytest.fixture(scope="module")
def one_process() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, world = presets.load("cpu", SETTINGS), World(0, 1, 0, torch.device("cpu"))
        return {packed: training_step(cfg, world, packed) for packed in (False, True)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_training_step_matches_one_process(one_process, layout):
    processes, packed, extra = LAYOUTS[layout]
    many = step_on_ranks(processes, pipeline_settings(processes, *extra),
                         {"expert_parallel": True, "pipeline_parallel": True}, training_step, packed)
    one = one_process[packed]
    for key in ("heads", "aux", "val", "norm"):
        assert torch.allclose(torch.tensor(many[key]), torch.tensor(one[key]), rtol=0, atol=1e-4), key
    assert (many["load"] == one["load"]).all()  # every MoE layer's load, each counted on its own stage
    assert 0 <= many["bubble"] < 1
    assert one["grads"].keys() == many["grads"].keys()
    for kind in ("grads", "weights"):
        for name, want in one[kind].items():
            torch.testing.assert_close(torch.from_numpy(many[kind][name]), torch.from_numpy(want), rtol=0,
                                       atol=1e-4, msg=f"{kind} {name}")


def test_stages_split_the_sublayers_by_count():
    assert stage_spans(10, 2) == [range(0, 5), range(5, 10)]
    assert stage_spans(108, 4) == [range(0, 27), range(27, 54), range(54, 81), range(81, 108)]
    assert stage_spans(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]  # the last runs lm_head and MTP too


@pytest.mark.parametrize("extra, message", [
    (["parallel.context=2", "train.seq_len=32"], "not context parallelism"),
    (["parallel.strategy=ddp"], "parallel.strategy=fsdp"),
    (["train.global_batch_size=2"], "at least as many micro-batches per step as pipeline stages"),
])
def test_layouts_that_cannot_run_are_refused(extra, message):
    cfg = presets.load("cpu", pipeline_settings(4) + extra)
    with pytest.raises(UserError, match=message):
        distributed.check_layout(cfg, World(0, 4, 0, torch.device("cpu")), context_parallel=True,
                                 expert_parallel=True, pipeline_parallel=True)


def test_stages_that_do_not_pipeline_refuse_it():
    cfg = presets.load("cpu", pipeline_settings(2))
    with pytest.raises(UserError, match="parallel.pipeline = 2: this stage trains data-parallel"):
        distributed.check_layout(cfg, World(0, 2, 0, torch.device("cpu")))


def test_pretrain_writes_the_checkpoint_of_one_process_and_resumes_in_one(small_corpus, tmp_path):
    """`torchrun ... n3 pretrain` with 2 pipeline stages writes the HF weights one process writes, and the bubble
    share in metrics.jsonl; its step-2 training state resumes in one process to the same weights."""
    args = settings(small_corpus, "train.steps=4", "train.checkpoint_interval=2", "train.eval_interval=2",
                    "train.mtp_depths=1")
    single = n3_process("pretrain", "--out", str(tmp_path / "one"), *args)
    assert single.wait(timeout=300) == 0, single.stderr.read()
    piped = torchrun("pretrain", "--out", str(tmp_path / "pp"), *args,
                     *[a for s in ("parallel.strategy=fsdp", "parallel.gpus_per_node=2", "parallel.pipeline=2")
                       for a in ("--set", s)])
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert_same_weights(hf_weights(tmp_path / "pp", 4), hf_weights(tmp_path / "one", 4))
    records, alone = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("pp", "one"))
    assert all(0 <= r["pipeline_bubble_share"] < 1 for r in records)
    for a, b in zip(records, alone):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-4

    shutil.rmtree(tmp_path / "pp" / "checkpoints" / "step-00000004")
    resumed = n3_process("pretrain", "--resume", "--out", str(tmp_path / "pp"), "--set", "parallel.pipeline=1",
                         "--set", "parallel.gpus_per_node=1")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_weights(hf_weights(tmp_path / "pp", 4), hf_weights(tmp_path / "one", 4))


def test_the_plan_says_how_the_stages_are_cut():
    gb200 = plan_run(presets.load("gb200"))
    assert gb200.runs[1] == ("pipeline: n3 pretrain runs 4 stages of 27 sublayers (the first also the embeddings, "
                             "the last the final norm, lm_head and MTP head), 1F1B over 24 micro-batches a step: "
                             "11.1% of it idle; the other stages refuse it")


def test_gb200s_layout_trains_scaled_down(small_corpus, tmp_path):
    """Data x pipeline x expert parallelism on the tiny shape: 4 gloo processes, 2 stages, each FSDP2 over 2 ranks
    that split its experts."""
    scaled = ["shape=tiny", "parallel.nodes=1", "parallel.gpus_per_node=4", "parallel.pipeline=2",
              "parallel.expert=2", "precision.compute=fp32", "precision.params=fp32", "train.tokens=0",
              "train.steps=2", "train.eval_interval=2", "train.micro_batch_size=1"]
    run = torchrun("pretrain", "--preset", "gb200", "--out", str(tmp_path / "gb200"),
                   *settings(small_corpus, *scaled), processes=4)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_metrics(tmp_path / "gb200" / "metrics.jsonl")
    assert len(records) == 2 and all("ep_received_max_over_mean" in r and "pipeline_bubble_share" in r
                                     for r in records)

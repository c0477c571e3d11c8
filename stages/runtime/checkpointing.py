"""Checkpoints of a training run: each a complete Hugging Face checkpoint plus the state to resume from.

    RUN/checkpoints/step-00000200/
        config.json, model-*.safetensors, model.safetensors.index.json   the weights (model.checkpoint)
        tokenizer.json, tokenizer_config.json                             the tokenizer
        trainer.json                                                      step, data position, monitor, run facts
        rng-<rank>.pt                                                     each rank's random generators
        training_state/                                                   model + optimizer, torch.distributed.checkpoint

The training state is written by every rank in parallel (sharded under FSDP); the HF weights are gathered on rank 0.
A step directory appears in one rename when everything is written, so a killed run leaves its last complete
checkpoint and nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from model.checkpoint import atomic_directory, resolve_checkpoint, run_checkpoints, write_pretrained
from model.errors import UserError
from model.hybrid import NemotronH
from model.tokenizer import Tokenizer
from stages.runtime.distributed import World
from stages.runtime.lora import merged_state
from stages.runtime.pipeline import PipelineLayout, gather_stages

TRAINER = "trainer.json"
STATE = "training_state"
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""The optimizer's state and hyperparameters keyed by parameter name, so that ranks holding different parameters
(pipeline stages) save and load their own, and a training state resumes under any layout."""


def step_directory(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run: Path, step: int, objective: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
    tokenizer: Tokenizer, world: World, keep: int = 0, pipeline: PipelineLayout | None = None,
) -> Path:
    """Write checkpoint `step` of the run (collective: every rank calls it). `objective` holds the NemotronH as
    `.model` (wrapped or not, or one pipeline stage of it with `pipeline`); `trainer` is what resume needs besides
    tensors. Keeps the newest `keep` (0: all)."""
    path = step_directory(run, step)
    model_state, optimizer_state = get_state_dict(objective, optimizer, options=STATE_OPTIONS)
    # Offloaded, the full state lands on rank 0 alone; a pipeline gathers each stage's from the stage's own ranks.
    offload = StateDictOptions(full_state_dict=True, cpu_offload=pipeline is None)
    full = gather_stages(get_model_state_dict(objective, options=offload), pipeline)
    with _shared_atomic_directory(path, world) as tmp:
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / STATE,
                     no_dist=not world.distributed)
        torch.save(_rng_state(), tmp / f"rng-{world.rank}.pt")
        if world.is_main:
            model = _bare_model(objective, full)
            special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
            write_pretrained(model, tmp, extra_config=special)
            tokenizer.save(tmp)
            (tmp / TRAINER).write_text(json.dumps(trainer | {"step": step}, indent=2))
    if world.is_main and keep:
        for old in sorted((Path(run) / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return path


def latest_resumable(run: Path) -> Path:
    """The newest checkpoint of a run folder, checked to hold a training state; a clear error otherwise."""
    run = Path(run)
    if not (run / "checkpoints").is_dir():
        raise UserError(f"cannot resume: {run} is not a run folder (it has no checkpoints/); "
                        "start a new run without --resume")
    path = resolve_checkpoint(run)
    if not (path / TRAINER).is_file() or not (path / STATE).is_dir():
        raise UserError(f"cannot resume from {path}: it holds weights but no training state ({TRAINER}, {STATE}/)")
    return path


def stage_of(checkpoint: Path) -> str | None:
    """The stage that wrote a checkpoint ("pretrain", "sft", ...) as its trainer.json says; None for a checkpoint
    no n3 stage wrote (a released one) or an unreadable one."""
    try:
        trainer = json.loads((Path(checkpoint) / TRAINER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return trainer.get("stage", "pretrain" if "corpus" in trainer else None)


def newest_run(root: Path, stage: str | tuple[str, ...], accept: Callable[[Path], bool] | None = None
               ) -> Path | None:
    """The run folder under `root` whose newest checkpoint `stage` (or one of several) wrote (and that `accept(run)`
    accepts), written last; None if there is none."""
    stages = (stage,) if isinstance(stage, str) else stage
    runs = []
    for run in (folder.parent for folder in Path(root).glob("*/checkpoints")):
        steps = run_checkpoints(run)
        if steps and stage_of(steps[-1]) in stages and (accept is None or accept(run)):
            runs.append((steps[-1].stat().st_mtime, run))
    return max(runs)[1] if runs else None


def start_run_folder(run: Path, name: str, preset_toml: str | None) -> None:
    """A new run goes into a folder without checkpoints; it keeps the resolved preset (as NAME.toml) for --resume."""
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(f"{run} holds a run already: pass --resume to continue it, or --out DIR to start another")
    run.mkdir(parents=True, exist_ok=True)
    if preset_toml is not None:
        for stale in run.glob("*.toml"):  # from a run that died before its first checkpoint
            stale.unlink()
        (run / f"{name}.toml").write_text(preset_toml + "\n")


def starting_point(run: Path, checkpoint: Path | None, resume: bool, stage: str, kind: str
                   ) -> tuple[Path, Path | None, dict | None]:
    """What a stage's run starts from: the checkpoint given (or a run folder's newest); on --resume the run's newest
    checkpoint, which `stage` must have written (`kind`, e.g. "an SFT run", names it in the error), its trainer
    state, and the checkpoint the run started from. Returns (start, resumed checkpoint, trainer state)."""
    if not resume:
        return resolve_checkpoint(checkpoint), None, None
    path = latest_resumable(run)
    if stage_of(path) != stage:
        raise UserError(f"cannot resume {run}: it is not {kind} (its checkpoints were written by "
                        f"{stage_of(path) or 'no n3 stage'}); start a new run without --resume")
    trainer = read_trainer_state(path)
    return Path(trainer["start"]), path, trainer


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path / TRAINER} is unreadable ({err}): corrupt checkpoint") from None


def load_checkpoint(path: Path, objective: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """Restore model, optimizer and this rank's random generators from checkpoint `path`; return the trainer state."""
    trainer = read_trainer_state(path)
    model_state, optimizer_state = get_state_dict(objective, optimizer, options=STATE_OPTIONS)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path / STATE, no_dist=not world.distributed)
    except (Exception, CheckpointException) as err:  # dcp gathers every rank's failure in a BaseException
        cause = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) else err
        message = f"{type(cause).__name__} {' '.join(str(cause).split())[:200]}".strip()
        raise UserError(f"cannot read the training state in {path / STATE}: {message} (corrupt checkpoint?)") from None
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=STATE_OPTIONS)
    rng = path / f"rng-{world.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return trainer


def resume_loop(path: Path | None, objective: nn.Module, optimizer: torch.optim.Optimizer, batches, world: World,
                note: Callable[[str], None] = lambda message: None) -> tuple[int, dict | None]:
    """Restore a training loop's checkpoint: model, optimizer, generators and the step source's position, and `note`
    it. Returns the step it was written at and the monitor's state, as runtime.loop.run_loop takes them; (0, None)
    for no checkpoint (a run that starts afresh)."""
    if path is None:
        return 0, None
    trainer = load_checkpoint(path, objective, optimizer, world)
    batches.load_state_dict(trainer["data"])
    note(f"resuming {path.parent.parent} from step {trainer['step']} ({path.name})")
    return trainer["step"], trainer.get("monitor")


@contextlib.contextmanager
def _shared_atomic_directory(path: Path, world: World) -> Iterator[Path]:
    """atomic_directory for all ranks: rank 0 makes the temporary directory and renames it once all have written."""
    if world.is_main:
        with atomic_directory(path) as tmp:
            world.broadcast(str(tmp))
            yield tmp
            world.barrier()
    else:
        tmp = Path(world.broadcast(None))
        yield tmp
        world.barrier()


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """dcp warns that it runs in one process even when told to (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _bare_model(objective: nn.Module, full_state: dict[str, torch.Tensor]) -> NemotronH:
    """A plain NemotronH holding the gathered full weights, LoRA adapters merged in (for writing HF files)."""
    inner = getattr(objective, "module", objective)
    config = inner.model.config
    with torch.device("meta"):
        model = NemotronH(config)
    full_state = merged_state(full_state, inner)
    weights = {k.removeprefix("model."): v for k, v in full_state.items() if k.startswith("model.")}
    model.load_state_dict(weights, assign=True)
    return model


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

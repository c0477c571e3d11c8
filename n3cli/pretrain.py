"""`n3 pretrain`: train a model from scratch on a prepared corpus (REFERENCE.md section 2).

With no arguments: the `cpu` preset (the tiny shape) on the built-in corpus, prepared on first use, into runs/cpu/.
Under torchrun every rank runs this command; rank 0 prepares the corpus, shows progress and prints the report:
    torchrun --nproc-per-node 8 -m n3cli pretrain --preset h100
"""

from __future__ import annotations

from pathlib import Path

from n3cli.options import DEFAULT_PRESET, DryRun, Out, Preset, Resume, Sets, load_preset, resumed_preset
from presets import RunConfig


def run(
    preset: Preset = DEFAULT_PRESET, overrides: Sets = None, out: Out = None, dry_run: DryRun = False,
    resume: Resume = False,
) -> None:
    """Pretrain the preset's model; --dry-run prints the plan without allocating."""
    cfg = load_preset(preset, overrides)
    if dry_run:
        from n3cli.report import print_plan
        from stages.plan import plan_run

        print_plan(plan_run(cfg))
        return
    run_dir = out or Path("runs") / cfg.name
    if resume:
        cfg = resumed_preset(run_dir, preset, overrides)
    _train(cfg, run_dir, resume)


def _train(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    from n3cli.progress import training_session
    from n3cli.report import print_pretrain
    from stages.pretrain import pretrain

    with training_session(cfg) as (progress, preset_toml):
        corpus, prepare_corpus = pretraining_corpus(cfg, cfg.model.vocab_size, progress)
        result = pretrain(cfg, corpus, run_dir, resume=resume, progress=progress, prepare_corpus=prepare_corpus,
                          preset_toml=preset_toml)
    if result is not None:
        print_pretrain(result)


def pretraining_corpus(cfg: RunConfig, vocab_size: int, progress=None):
    """The corpus folder a run trains on (data.path, else the built-in corpus for the vocabulary size) and, for the
    built-in one, the function that prepares it (None for data.path)."""
    from stages.data import CorpusOptions, default_corpus_dir, parse_sources, prepare

    if cfg.data.path:
        return Path(cfg.data.path), None
    corpus = default_corpus_dir(vocab_size)
    return corpus, lambda: prepare(parse_sources([]), corpus, CorpusOptions(vocab_size=vocab_size), progress)

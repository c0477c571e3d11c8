"""`n3 pretrain`: train a model from scratch on a prepared corpus (REFERENCE.md section 2)."""

from __future__ import annotations

from n3cli.options import DEFAULT_PRESET, DryRun, Out, Preset, Sets, load_preset


def run(preset: Preset = DEFAULT_PRESET, overrides: Sets = None, out: Out = None, dry_run: DryRun = False) -> None:
    """Pretrain the preset's model; --dry-run prints the plan without allocating."""
    cfg = load_preset(preset, overrides)
    if dry_run:
        from n3cli.report import print_plan
        from stages.plan import plan_run

        print_plan(plan_run(cfg))
        return
    from model.errors import UserError

    raise UserError("training is not wired yet; use --dry-run")

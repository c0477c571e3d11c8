"""`n3 mopd`'s distillation run synchronously and asynchronously on the same work: the same student, teachers,
prompts, steps and settings, once with generation, teacher scoring and updates one after another
(mopd.asynchronous = false) and once on the pipeline's three threads with bounded staleness; prints the seconds and
generated tokens per second of each and the ratio.

    python benchmarks/mopd_pipeline.py                                  # the newest SFT run, taught by the newest RLVR run
    python benchmarks/mopd_pipeline.py --steps 12 --staleness 2 --threads 2

Both runs are the stage itself (stages.mopd.mopd) with the warmup off and a held-out evaluation of two problems per
domain (what the stage measures before and after is not what is timed here); the time is the distillation's own:
the sum of the steps' wall times, the first step's pipeline fill included. The work differs a little between the
two: asynchronously a batch may be sampled by a policy up to --staleness versions old, so its replies (and their
lengths) are not the synchronous run's; tokens per second accounts for that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from presets import load  # noqa: E402
from stages.mopd import mopd  # noqa: E402
from stages.runtime.checkpointing import newest_run  # noqa: E402
from stages.runtime.metrics import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, default=None, help="default: the newest n3 sft run")
    parser.add_argument("--teacher", type=Path, default=None, help="every domain's teacher; default: the newest "
                        "n3 rlvr run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=128, help="prompts per step")
    parser.add_argument("--staleness", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student = args.student or newest_run(Path("runs"), "sft")
    teacher = args.teacher or newest_run(Path("runs"), "rlvr")
    if student is None or teacher is None:
        sys.exit("give --student and --teacher (no n3 sft or n3 rlvr run under runs/)")
    results = {}
    for asynchronous in (False, True):
        cfg = load("cpu", [f"mopd.train.steps={args.steps}", f"mopd.prompts_per_step={args.prompts}",
                           "mopd.warmup.steps=0", "mopd.eval_problems=2", f"mopd.max_staleness={args.staleness}",
                           f"mopd.asynchronous={str(asynchronous).lower()}", f"mopd.train.checkpoint_interval={args.steps}"])
        with tempfile.TemporaryDirectory() as folder:
            domains = [spec.partition(":")[0] for spec in cfg.mopd.envs]
            mopd(cfg, Path(folder) / "run", student, {d: str(teacher) for d in domains})
            records = read_metrics(Path(folder) / "run" / "metrics.jsonl")
        seconds = sum(r["seconds"]["step"] for r in records)
        tokens = sum(r["generated_tokens"] for r in records)
        results[asynchronous] = (seconds, tokens, max(r["staleness"] for r in records),
                                 {k: sum(r["seconds"][k] for r in records) for k in ("generate", "score", "update")})
    print(f"{args.steps} steps of {args.prompts} prompts, {args.threads} threads; student {student}, teacher {teacher}")
    for asynchronous, (seconds, tokens, staleness, parts) in results.items():
        split = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        print(f"{'async' if asynchronous else 'sync ':5}  {seconds:7.1f} s  {tokens / seconds:8.0f} generated tokens/s  "
              f"max staleness {staleness}  ({split})")
    (sync_s, sync_t, _, _), (async_s, async_t, _, _) = results[False], results[True]
    print(f"async / sync throughput: {(async_t / async_s) / (sync_t / sync_s):.2f}x")


if __name__ == "__main__":
    main()

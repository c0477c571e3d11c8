"""Verifiable tasks built in: seeded problem generators with reward checkers, shared by SFT data, RLVR, distillation
and evaluation (REFERENCE.md section 4).

    task = TASKS["math"]                                  # also "code" and "instructions"
    problems = task.problems("train", 1000, seed=0, levels=[1, 2])
    problems[0].messages()                                # the chat an SFT row is made of
    task.score(problems[0].data, completion)              # Score(reward, passed, reason, error, seconds)

Each domain has difficulty levels (1 = easiest). A problem's split is `split_of(problem.key)`, and generators keep
only the problems of the split asked for, so test problems never reach training, whatever the seeds. A Score with
error=True means the checker or the program runner failed: drop that sample rather than score it 0.

RL trains on environments (stages.envs.environments): these tasks, your rows scored by their checkers, or your own
class, behind one interface that gives Prompts and scores replies.
"""

from stages.envs.base import Problem, Score, Task, split_of
from stages.envs.code import CodeTask
from stages.envs.instructions import InstructionsTask
from stages.envs.math import MathTask

TASKS: dict[str, Task] = {"math": MathTask(), "code": CodeTask(), "instructions": InstructionsTask()}

# After TASKS: the environments score through it.
from stages.envs.environments import (  # noqa: E402
    Environment,
    Prompt,
    blend_prompts,
    load_environment,
    load_environments,
)

__all__ = ["TASKS", "Environment", "Problem", "Prompt", "Score", "Task", "blend_prompts", "load_environment",
           "load_environments", "split_of"]

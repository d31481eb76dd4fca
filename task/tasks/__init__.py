"""Tasks: what the model learns and how it is scored, one registered object each.

A task owns the columns it needs, encoding, batch collation (with loss masks), the
loss, the PEFT task type and the evaluation. Training, DP training, the server's
evaluator and the experiment runner ask the task; none of them branches on its name.
Adding a task is one module with a :class:`Task` subclass and a :func:`register` call
(``tests/task/test_tasks.py`` shows one).
"""

from task.tasks import causal_lm, classification, instruction  # noqa: F401  (registration)
from task.tasks.base import Evaluation, Task
from task.tasks.registry import get_task, register, task_names

__all__ = ["Evaluation", "Task", "get_task", "register", "task_names"]

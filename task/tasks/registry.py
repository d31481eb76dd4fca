"""The registry of tasks: a name in the run config maps to one :class:`~task.tasks.base.Task`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from task.tasks.base import Task

_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` available under its ``name`` (the ``task`` run-config value).

    Raises:
        ValueError: another task already has that name.

    """
    if task.name in _TASKS and type(_TASKS[task.name]) is not type(task):
        raise ValueError(f"task '{task.name}' is already registered")
    _TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    """The registered task names."""
    import task.tasks  # noqa: F401  (registers the built-in tasks)

    return tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
        ValueError: no such task; the message lists the registered ones.

    """
    import task.tasks  # noqa: F401  (registers the built-in tasks)

    if name not in _TASKS:
        raise ValueError(f"task must be one of {tuple(_TASKS)}, got '{name}'")
    return _TASKS[name]


def as_task(task: Task | str | None) -> Task:
    """The task object for a task or its registered name (``None``: classification)."""
    if task is None or isinstance(task, str):
        return get_task(task or "classification")
    return task

"""A tokenized dataset, as every task hands it to training, DP training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Encoded:
    """Token ids per example and what the task needs beside them.

    ``labels``: one class per example (classification). ``prompt_lengths``: how many of
    an example's leading tokens are prompt (instruction tuning): the loss covers only the
    tokens after them, and generation starts there. ``references``: each example's
    response text, what generated answers are scored against; ``groups``: an optional
    label per example under which generation metrics are also reported. ``task``: the
    registered task that made it (:mod:`task.tasks`); an empty name means classification
    when there are labels, else causal LM. ``dropped``: examples left out while encoding
    (a response longer than ``max-length``).
    """

    input_ids: list[list[int]]
    labels: list[int] | None = None
    prompt_lengths: list[int] | None = None
    references: list[str] | None = None
    groups: list[str] | None = None
    task: str = ""
    dropped: int = 0

    def __post_init__(self) -> None:
        if not self.task:
            self.task = "classification" if self.labels is not None else "causal-lm"

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> Encoded:
        """The examples at ``indices``, in that order (``dropped`` is kept)."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in indices]

        return Encoded(input_ids=[self.input_ids[i] for i in indices], labels=pick(self.labels),
                       prompt_lengths=pick(self.prompt_lengths),
                       references=pick(self.references), groups=pick(self.groups),
                       task=self.task, dropped=self.dropped)

    def empty(self) -> Encoded:
        """No examples, of the same task and kind."""
        return self.subset([])

"""Canary examples for an empirical privacy audit of a text classifier.

A canary is a string of words drawn uniformly at random from the data's own vocabulary,
with a label drawn uniformly at random: it looks like nothing in the data, so a model
can only fit its label by memorising it, which is what a membership audit measures.
Canaries are made deterministically from a seed, and never equal a real example (up to
case, punctuation and spacing) or one another.

For a one-run audit (:func:`privacy.audit.audit_canaries`) each canary is included in
training with an independent fair coin (:func:`inclusion_mask`, :func:`split_canaries`);
the included ones are appended to one client's partition (:func:`insert_canaries`), and
after training all of them, included or not, are scored (:func:`canary_dataset`).

Canary content and inclusion coins come from separate random streams of the same seed,
so one seed serves both and changing the coins' seed does not change the canaries.
``datasets`` is imported inside the functions that need it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from task.data import LABEL_COLUMN, TEXT_COLUMN

if TYPE_CHECKING:
    from datasets import Dataset

WORD = re.compile(r"[a-z]+")
DEFAULT_WORDS_PER_CANARY = 16
# Keys that separate the random streams of one seed (numpy SeedSequence entropy).
_CONTENT_STREAM, _INCLUSION_STREAM = 0xCA, 0x1C
_MAX_ATTEMPTS_PER_CANARY = 100


def _normalise(text: str) -> str:
    """The text's lower-case words joined by single spaces: a canary's own form."""
    return " ".join(WORD.findall(text.lower()))


def build_vocabulary(
    texts: Iterable[str], *, min_length: int = 3, min_count: int = 2
) -> list[str]:
    """Lower-case alphabetic words of at least ``min_length`` letters seen ``min_count`` times.

    Sorted, so the vocabulary depends only on the texts' contents, not their order.
    """
    counts = Counter(word for text in texts for word in WORD.findall(text.lower()))
    return sorted(w for w, c in counts.items() if len(w) >= min_length and c >= min_count)


@dataclass(frozen=True)
class Canaries:
    """Canary texts and their labels, in a fixed order (canary ``i`` is index ``i``).

    Attributes:
        texts: the canary strings.
        labels: their class indices.

    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, mask: np.ndarray) -> Canaries:
        """The canaries where the boolean ``mask`` is True, in order."""
        keep = np.asarray(mask)
        if keep.dtype != np.bool_ or keep.shape != (len(self),):
            raise ValueError(f"mask must be a boolean array of length {len(self)}")
        index = np.flatnonzero(keep)
        return Canaries(texts=tuple(self.texts[i] for i in index),
                        labels=tuple(self.labels[i] for i in index))


def make_canaries(
    texts: Sequence[str],
    num_labels: int,
    num_canaries: int,
    *,
    seed: int,
    words_per_canary: int = DEFAULT_WORDS_PER_CANARY,
    vocabulary: Sequence[str] | None = None,
) -> Canaries:
    """``num_canaries`` random-word canaries with uniformly random labels.

    Args:
        texts: the real examples' texts: the default vocabulary comes from them
            (:func:`build_vocabulary`), and no canary equals one of them.
        num_labels: labels are drawn uniformly from ``range(num_labels)``.
        num_canaries: how many to make.
        seed: the same seed, texts and settings give the same canaries.
        words_per_canary: words in each canary, drawn with replacement.
        vocabulary: the words to draw from; default ``build_vocabulary(texts)``.

    Raises:
        ValueError: invalid counts, a vocabulary of fewer than 2 words, or no room for
            that many distinct canaries that differ from the real texts.

    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    if num_canaries < 0:
        raise ValueError(f"num_canaries must be >= 0, got {num_canaries}")
    if words_per_canary < 1:
        raise ValueError(f"words_per_canary must be at least 1, got {words_per_canary}")
    words = list(build_vocabulary(texts) if vocabulary is None else vocabulary)
    if len(set(words)) < 2:
        raise ValueError(f"the vocabulary has {len(set(words))} distinct word(s); need 2+")
    rng = np.random.default_rng([_CONTENT_STREAM, seed])
    taken = {_normalise(text) for text in texts}
    made: list[str] = []
    attempts = 0
    while len(made) < num_canaries:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_CANARY * max(1, num_canaries):
            raise ValueError(
                f"could not make {num_canaries} distinct canaries of {words_per_canary} "
                f"word(s) from {len(words)} words that differ from the real texts"
            )
        text = " ".join(words[i] for i in rng.integers(0, len(words), size=words_per_canary))
        if _normalise(text) not in taken:  # never a real text, up to case and punctuation
            taken.add(_normalise(text))
            made.append(text)
    labels = rng.integers(0, num_labels, size=num_canaries)
    return Canaries(texts=tuple(made), labels=tuple(int(x) for x in labels))


def inclusion_mask(num_canaries: int, *, seed: int) -> np.ndarray:
    """Independent fair coins, True = "include in training": the audit's secret ``S``."""
    if num_canaries < 0:
        raise ValueError(f"num_canaries must be >= 0, got {num_canaries}")
    return np.random.default_rng([_INCLUSION_STREAM, seed]).random(num_canaries) < 0.5


def split_canaries(canaries: Canaries, *, seed: int) -> tuple[Canaries, np.ndarray]:
    """Flip a fair coin per canary: the included canaries, and the mask for the audit."""
    mask = inclusion_mask(len(canaries), seed=seed)
    return canaries.subset(mask), mask


def canary_dataset(canaries: Canaries, like: Dataset | None = None) -> Dataset:
    """The canaries as a ``Dataset`` of ``text`` and ``label``.

    With ``like``, its ``text`` and ``label`` features (e.g. the ``ClassLabel`` names),
    so the result concatenates with it; labels must then be in its label range.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    if like is not None:
        features = Features({TEXT_COLUMN: like.features[TEXT_COLUMN],
                             LABEL_COLUMN: like.features[LABEL_COLUMN]})
        label = features[LABEL_COLUMN]
        if isinstance(label, ClassLabel) and any(
                not 0 <= y < label.num_classes for y in canaries.labels):
            raise ValueError(f"canary labels outside [0, {label.num_classes})")
    else:
        features = Features({TEXT_COLUMN: Value("string"), LABEL_COLUMN: Value("int64")})
    return Dataset.from_dict(
        {TEXT_COLUMN: list(canaries.texts), LABEL_COLUMN: list(canaries.labels)},
        features=features,
    )


def insert_canaries(partition: Dataset, canaries: Canaries) -> Dataset:
    """A client's partition (``text`` and ``label`` columns) with ``canaries`` appended.

    Other columns of the partition are dropped: training reads only these two. Order
    does not matter to training, which samples batches at random.
    """
    from datasets import concatenate_datasets

    base = partition.select_columns([TEXT_COLUMN, LABEL_COLUMN])
    if len(canaries) == 0:
        return base
    return concatenate_datasets([base, canary_dataset(canaries, like=base)])

"""Canary examples for the privacy audit: deterministic, novel, fairly split."""

from __future__ import annotations

import numpy as np
import pytest

from task.canaries import (
    Canaries,
    build_vocabulary,
    canary_dataset,
    inclusion_mask,
    insert_canaries,
    make_canaries,
    split_canaries,
)
from tests.conftest import make_texts

TEXTS = [text for text, _, _ in make_texts(120)]


def test_vocabulary_counts_words_sorted_and_filtered():
    texts = ["The cat sat.", "the CAT ran", "a dog; the dog", "ox ox ox"]
    # "the" x3, "cat" x2, "dog" x2; "sat"/"ran" once; "a" and "ox" too short
    assert build_vocabulary(texts) == ["cat", "dog", "the"]
    assert build_vocabulary(texts, min_count=1) == ["cat", "dog", "ran", "sat", "the"]
    assert build_vocabulary(list(reversed(texts))) == build_vocabulary(texts)


def test_canaries_are_deterministic_per_seed():
    a = make_canaries(TEXTS, num_labels=3, num_canaries=50, seed=4)
    b = make_canaries(TEXTS, num_labels=3, num_canaries=50, seed=4)
    c = make_canaries(TEXTS, num_labels=3, num_canaries=50, seed=5)
    assert a == b
    assert a.texts != c.texts
    # the first canaries do not depend on how many are asked for
    assert make_canaries(TEXTS, 3, 10, seed=4).texts == a.texts[:10]


def test_canaries_are_novel_distinct_and_well_formed():
    canaries = make_canaries(TEXTS, num_labels=3, num_canaries=200, seed=0, words_per_canary=6)
    assert len(canaries) == 200
    assert len(set(canaries.texts)) == 200
    assert not set(canaries.texts) & {t.lower() for t in TEXTS}
    vocabulary = set(build_vocabulary(TEXTS))
    for text in canaries.texts:
        words = text.split(" ")
        assert len(words) == 6
        assert set(words) <= vocabulary
    assert set(canaries.labels) == {0, 1, 2}  # 200 uniform draws cover 3 labels
    assert all(isinstance(label, int) for label in canaries.labels)


def test_a_canary_equal_to_a_real_text_is_never_made():
    # one-word canaries over {alpha, beta, gamma}: "alpha" and "beta" are real texts
    # (up to case and punctuation), so the only possible canary is "gamma"
    texts = ["Alpha!", "beta", "alpha gamma", "beta gamma"]
    for seed in range(10):
        canaries = make_canaries(texts, 5, 1, seed=seed, words_per_canary=1,
                                 vocabulary=build_vocabulary(texts, min_count=1))
        assert canaries.texts == ("gamma",)
    with pytest.raises(ValueError, match="distinct canaries"):
        make_canaries(texts, 5, 2, seed=0, words_per_canary=1,
                      vocabulary=build_vocabulary(texts, min_count=1))


def test_canary_validation():
    with pytest.raises(ValueError, match="vocabulary"):
        make_canaries(["one word only"], 2, 1, seed=0, vocabulary=["word"])
    with pytest.raises(ValueError, match="num_labels"):
        make_canaries(TEXTS, 0, 1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        Canaries(texts=("a b",), labels=())


def test_inclusion_is_fair_independent_of_content_and_seeded():
    mask = inclusion_mask(2000, seed=0)
    assert mask.dtype == np.bool_
    # Binomial(2000, 1/2): mean 1000, sd 22.4; +-100 is 4.5 sd
    assert 900 <= mask.sum() <= 1100
    np.testing.assert_array_equal(mask, inclusion_mask(2000, seed=0))
    assert not np.array_equal(mask, inclusion_mask(2000, seed=1))
    # runs of equal coins look like fair coins: about half of neighbours differ
    assert 900 <= np.count_nonzero(mask[1:] != mask[:-1]) <= 1100
    # the same seed gives coins unrelated to the canary stream: the labels' parity
    # (also drawn from seed 0) agrees with the coins about half of the time
    labels = np.array(make_canaries(TEXTS, 2, 2000, seed=0, words_per_canary=8).labels)
    assert 900 <= np.count_nonzero((labels == 1) == mask) <= 1100


def test_split_returns_the_included_canaries_in_order():
    canaries = make_canaries(TEXTS, num_labels=3, num_canaries=40, seed=2)
    included, mask = split_canaries(canaries, seed=9)
    np.testing.assert_array_equal(mask, inclusion_mask(40, seed=9))
    assert included.texts == tuple(t for t, m in zip(canaries.texts, mask, strict=True) if m)
    assert included.labels == tuple(y for y, m in zip(canaries.labels, mask, strict=True) if m)
    assert len(canaries.subset(~mask)) == 40 - len(included)


def test_insert_canaries_into_a_classlabel_partition():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"),
                         "label": ClassLabel(names=["money", "music", "sport"]),
                         "source": Value("string")})
    rows = make_texts(12)
    partition = Dataset.from_dict(
        {"text": [t for t, _, _ in rows],
         "label": [["money", "music", "sport"].index(lab) for _, lab, _ in rows],
         "source": [s for _, _, s in rows]},
        features=features)
    canaries = make_canaries(TEXTS, num_labels=3, num_canaries=8, seed=1)
    merged = insert_canaries(partition, canaries)
    assert merged.column_names == ["text", "label"]
    assert len(merged) == 12 + 8
    assert merged["text"][12:] == list(canaries.texts)
    assert merged["label"][12:] == list(canaries.labels)
    assert merged["text"][:12] == partition["text"]
    assert merged.features["label"].names == ["money", "music", "sport"]
    assert len(insert_canaries(partition, canaries.subset(np.zeros(8, dtype=bool)))) == 12
    # labels beyond the partition's classes are refused
    five = make_canaries(TEXTS, num_labels=5, num_canaries=100, seed=1)
    with pytest.raises(ValueError, match="outside"):
        canary_dataset(five, like=partition)
    plain = canary_dataset(five)
    assert plain["label"] == list(five.labels)

"""The disk cache of tokenized data (task.encode_cache) returns exactly what tokenizing does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import Dataset

from task import encode_cache
from task.training import encode


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    from task.model import load_tokenizer
    from task.settings import ModelSettings

    return load_tokenizer(ModelSettings(model="tiny-bert"))


@pytest.fixture
def dataset() -> Dataset:
    texts = ["the match ended in a draw", "shares fell sharply", "a new album é ✓", ""] * 3
    return Dataset.from_dict({"text": texts, "label": [0, 1, 2, 1] * 3})


class CallCounter:
    """Counts the tokenizer calls (patched on the tokenizer's class for one test)."""

    def __init__(self, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = type(tokenizer).__call__

        def counted(tok: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(tok, *args, **kwargs)

        monkeypatch.setattr(type(tokenizer), "__call__", counted)


def test_second_encoding_comes_from_the_cache_and_is_identical(
    cache: Path, dataset: Dataset, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = encode(dataset, tiny_tokenizer, 8, "classification")
    counting = CallCounter(tiny_tokenizer, monkeypatch)
    cached = encode(dataset, tiny_tokenizer, 8, "classification")
    assert counting.calls == 0
    assert cached.input_ids == fresh.input_ids and cached.labels == fresh.labels
    assert cached.input_ids == tiny_tokenizer(list(dataset["text"]), truncation=True,
                                              max_length=8)["input_ids"]
    assert [p.suffix for p in cache.iterdir()] == [".npz"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in cache.iterdir())


def test_other_texts_lengths_or_tokenizers_are_other_entries(
    cache: Path, dataset: Dataset, tiny_tokenizer: Any
) -> None:
    fingerprint = encode_cache.tokenizer_fingerprint(tiny_tokenizer)
    assert fingerprint is not None
    texts = list(dataset["text"])
    key = encode_cache.content_key(texts, tokenizer=fingerprint, max_length=8)
    assert key != encode_cache.content_key(texts, tokenizer=fingerprint, max_length=9)
    assert key != encode_cache.content_key(texts[:-1], tokenizer=fingerprint, max_length=8)
    assert key != encode_cache.content_key(texts[:-2] + [texts[-1] + texts[-2]],
                                           tokenizer=fingerprint, max_length=8)
    assert key != encode_cache.content_key(texts, tokenizer=fingerprint[::-1], max_length=8)
    tiny_tokenizer(texts, truncation=True, max_length=3)  # per-call state is not identity
    assert encode_cache.tokenizer_fingerprint(tiny_tokenizer) == fingerprint
    tiny_tokenizer.truncation_side = "left"  # but the side truncation cuts from is
    try:
        assert encode_cache.tokenizer_fingerprint(tiny_tokenizer) != fingerprint
    finally:
        tiny_tokenizer.truncation_side = "right"
    encode(dataset, tiny_tokenizer, 8, "classification")
    encode(dataset, tiny_tokenizer, 5, "classification")
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["garbage", "pickle", "offsets", "truncated"])
def test_a_damaged_entry_is_recomputed_never_trusted(
    cache: Path, dataset: Dataset, tiny_tokenizer: Any, damage: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fresh = encode(dataset, tiny_tokenizer, 8, "classification")
    (entry,) = cache.iterdir()
    if damage == "garbage":
        entry.write_bytes(b"not an npz file")
    elif damage == "pickle":
        np.savez(entry.open("wb"), ids=np.array([object()], dtype=object),
                 offsets=np.array([0, 1]))
    elif damage == "offsets":
        np.savez(entry.open("wb"), ids=np.arange(5), offsets=np.array([0, 7, 3]))
    else:
        entry.write_bytes(entry.read_bytes()[:40])
    counting = CallCounter(tiny_tokenizer, monkeypatch)
    again = encode(dataset, tiny_tokenizer, 8, "classification")
    assert counting.calls == 1 and again.input_ids == fresh.input_ids
    assert encode_cache.load(entry.stem) == fresh.input_ids  # rewritten


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            dataset: Dataset, tiny_tokenizer: Any) -> None:
    monkeypatch.setenv("FEDLORA_CACHE_DIR", "off")
    assert encode_cache.cache_dir() is None
    counting = CallCounter(tiny_tokenizer, monkeypatch)
    encode(dataset, tiny_tokenizer, 8, "classification")
    encode(dataset, tiny_tokenizer, 8, "classification")
    assert counting.calls == 2


def test_default_location_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert encode_cache.cache_dir() == tmp_path / "fedlora" / "encoded"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "relative/home")
    assert encode_cache.cache_dir() is None


def test_the_least_recently_used_entries_go_when_the_cache_is_full(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    rows = [[7] * 1000] * 10  # ~40 kB of ids per entry
    for i, key in enumerate(("a", "b", "c")):
        encode_cache.save(key, rows)
        os.utime(cache / f"{key}.npz", (1000 + i, 1000 + i))  # a oldest, c newest
    assert encode_cache.load("a") == rows  # a use makes "a" the most recent
    monkeypatch.setenv("FEDLORA_CACHE_MAX_MB", "0.1")  # room for two entries
    encode_cache.save("d", rows)
    assert {p.stem for p in cache.glob("*.npz")} == {"a", "d"}
    monkeypatch.setenv("FEDLORA_CACHE_MAX_MB", "0")  # even then the entry just written stays
    encode_cache.save("e", rows)
    assert {p.stem for p in cache.glob("*.npz")} == {"e"}
    monkeypatch.setenv("FEDLORA_CACHE_MAX_MB", "lots")
    with pytest.raises(ValueError, match="FEDLORA_CACHE_MAX_MB='lots' is not a number"):
        encode_cache.max_bytes()

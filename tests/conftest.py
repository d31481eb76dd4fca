"""Shared fixtures: tiny models saved to disk and small, learnable datasets."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strategies.adapter import LoraAdapter, LoraFactors

TOPICS = {
    "sport": ["match", "goal", "team", "league", "coach", "season", "score", "player"],
    "money": ["bank", "market", "shares", "profit", "trade", "price", "economy", "tax"],
    "music": ["album", "band", "song", "concert", "guitar", "singer", "tour", "chart"],
}


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(text, label, source) rows: each text mixes words of its topic with filler."""
    rng = random.Random(seed)
    filler = ["the", "a", "today", "new", "said", "after", "with", "week", "big"]
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = rng.choices(TOPICS[label], k=6) + rng.choices(filler, k=6)
        rng.shuffle(words)
        rows.append((" ".join(words), label, f"site{i % 4}"))
    return rows


@pytest.fixture(scope="session", autouse=True)
def encode_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests share a fresh tokenization cache, never the user's (task.encode_cache)."""
    folder = tmp_path_factory.mktemp("encode-cache")
    previous = os.environ.get("FEDLORA_CACHE_DIR")
    os.environ["FEDLORA_CACHE_DIR"] = str(folder)  # inherited by Ray workers and subprocesses
    yield folder
    if previous is None:
        os.environ.pop("FEDLORA_CACHE_DIR", None)
    else:
        os.environ["FEDLORA_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def node_state_dir(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets a fresh node state folder (pins, DP ledgers), never the user's."""
    folder = tmp_path_factory.mktemp("node-state")
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(folder))  # privacy.files.state_dir
    return folder


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["body", "topic", "source"])
        writer.writerows(make_texts(240))
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT classifier (3 labels) saved with save_pretrained, as a local model dir."""
    from task.model import load_base_model, load_tokenizer
    from task.settings import ModelSettings

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    settings = ModelSettings(model="tiny-bert")
    load_base_model(settings, num_labels=3, seed=0).save_pretrained(str(path))
    load_tokenizer(settings).save_pretrained(str(path))
    return path


def tiny_run_config(model: str | Path, dataset: str | Path, **extra: object) -> dict[str, object]:
    """A run config for fast tests on the toy data."""
    config: dict[str, object] = {
        "model": str(model), "dataset": str(dataset), "text-column": "body",
        "label-column": "topic", "max-length": 24, "lora-rank": 4, "lora-alpha": 8.0,
        "local-steps": 3, "batch-size": 8, "learning-rate": 0.01, "partitioner": "iid",
        "eval-batch-size": 32,
    }
    config.update(extra)
    return config


def random_adapter(
    rng: np.random.Generator, ranks: dict[str, int], *, in_f: int = 6, out_f: int = 5,
    alpha: float = 8.0, head: bool = True,
) -> LoraAdapter:
    """An adapter with random factors; one module per entry of ``ranks``."""
    modules = {
        name: LoraFactors(A=rng.standard_normal((r, in_f)).astype(np.float32),
                          B=rng.standard_normal((out_f, r)).astype(np.float32))
        for name, r in ranks.items()
    }
    extras = {"base_model.model.classifier.weight":
              rng.standard_normal((3, in_f)).astype(np.float32)} if head else {}
    return LoraAdapter(modules=modules, alpha=alpha, extras=extras)


@pytest.fixture
def task_identity():
    """Flower's process identity, which building a Message outside a running app needs."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved

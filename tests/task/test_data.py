import json
from collections import Counter
from pathlib import Path

import pytest

from task.data import load_partition, load_task_data
from task.settings import DataSettings
from tests.conftest import make_texts


def _settings(dataset, **kw):
    base = {"text_column": "body", "label_column": "topic"}
    base.update(kw)
    return DataSettings(dataset=str(dataset), **base)


def test_csv_columns_are_renamed_and_labels_encoded(toy_csv):
    data = load_task_data(_settings(toy_csv), "classification")
    assert data.label_names == ["money", "music", "sport"]
    assert len(data.train) + len(data.test) == 240
    assert len(data.test) == 48  # test-fraction 0.2
    assert {"text", "label"} <= set(data.train.column_names)
    # stratified: every class present in the held-out split
    assert set(data.test["label"]) == {0, 1, 2}


def test_split_is_deterministic_and_disjoint(toy_csv):
    a = load_task_data(_settings(toy_csv, seed=1), "classification")
    b = load_task_data(_settings(toy_csv, seed=1), "classification")
    assert a.test["text"] == b.test["text"]
    assert not set(a.train["text"]) & set(a.test["text"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_other_file_formats(tmp_path: Path, suffix):
    rows = [{"body": t, "topic": lab} for t, lab, _ in make_texts(30)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_task_data(_settings(path), "classification")
    assert len(data.train) + len(data.test) == 30


def test_text_folder_per_label(tmp_path: Path):
    for text, label, _ in make_texts(30):
        folder = tmp_path / label
        folder.mkdir(exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.txt").write_text(text)
    data = load_task_data(DataSettings(dataset=str(tmp_path)), "classification")
    assert data.label_names == ["money", "music", "sport"]


def test_embedded_bbc_news():
    data = load_task_data(DataSettings(), "classification")
    assert len(data.train) + len(data.test) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.test) == 445


def test_missing_column_names_the_columns(toy_csv):
    with pytest.raises(ValueError, match=r"column\(s\) \['text'\] not in the dataset; its columns"):
        load_task_data(DataSettings(dataset=str(toy_csv), label_column="topic"), "classification")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_task_data(DataSettings(dataset="/nonexistent/data.csv"), "classification")


def test_iid_partitions_cover_the_train_pool(toy_csv):
    s = _settings(toy_csv, partitioner="iid")
    data = load_task_data(s, "classification")
    parts = [load_partition(data.train, s, partition_id=i, num_partitions=4) for i in range(4)]
    assert sum(len(p) for p in parts) == len(data.train)
    assert sorted(t for p in parts for t in p["text"]) == sorted(data.train["text"])


def test_a_shared_partitioner_gives_the_partitions_of_fresh_ones(toy_csv):
    from task.data import make_partitioner

    s = _settings(toy_csv, partitioner="dirichlet", dirichlet_alpha=0.5)
    data = load_task_data(s, "classification")
    shared = make_partitioner(s, 3, data.train)
    for i in (2, 0, 1):
        reused = load_partition(data.train, s, partition_id=i, num_partitions=3,
                                partitioner=shared)
        fresh = load_partition(data.train, s, partition_id=i, num_partitions=3)
        assert reused["text"] == fresh["text"] and reused["label"] == fresh["label"]


def test_dirichlet_small_alpha_skews_labels(toy_csv):
    s = _settings(toy_csv, partitioner="dirichlet", dirichlet_alpha=0.1)
    data = load_task_data(s, "classification")
    part = load_partition(data.train, s, partition_id=0, num_partitions=3)
    counts = Counter(part["label"])
    assert max(counts.values()) / len(part) > 0.5  # dominated by one class


def test_natural_partition_by_column(toy_csv):
    s = _settings(toy_csv, partitioner="natural", partition_by="source")
    data = load_task_data(s, "classification")
    part = load_partition(data.train, s, partition_id=2, num_partitions=4)
    assert len(set(part["source"])) == 1
    with pytest.raises(ValueError, match="has 4 distinct values but there are 3 clients"):
        load_partition(data.train, s, partition_id=0, num_partitions=3)


def test_more_clients_than_examples(toy_csv):
    s = _settings(toy_csv, partitioner="iid")
    data = load_task_data(s, "classification")
    with pytest.raises(ValueError, match="1000 clients but only 192 training examples"):
        load_partition(data.train, s, partition_id=0, num_partitions=1000)


def test_partition_id_out_of_range(toy_csv):
    s = _settings(toy_csv)
    data = load_task_data(s, "classification")
    with pytest.raises(ValueError, match=r"partition-id 5 not in \[0, 2\)"):
        load_partition(data.train, s, partition_id=5, num_partitions=2)

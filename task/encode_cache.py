"""A disk cache of tokenized data, shared by every process on a machine.

Tokenizing a client's partition costs about 0.4 s per 500 BBC articles with MiniLM's
tokenizer, every time a process first needs it: in a simulation each Ray worker encodes
every partition it is handed, and in a deployment a Flower 1.42 SuperNode starts a fresh
ClientApp process for every message, so a client tokenizes its data again every round.
The cache makes that a file read.

Entries are content-addressed: the key hashes the texts themselves, the tokenizer's
full serialized definition and ``max_length``. A change in any of them is a different
key, so an entry can never be stale. Files are ``.npz`` arrays read
with ``allow_pickle=False`` and checked before use; an unreadable or inconsistent entry
is ignored and rewritten.

Where: ``$FEDLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedlora/encoded``, else
``~/.cache/fedlora/encoded``. ``FEDLORA_CACHE_DIR=off`` turns the cache off. Entries are
private to their user (mode 0600) and may be deleted at any time. The folder is kept
under ``$FEDLORA_CACHE_MAX_MB`` megabytes (default 2048): after a write, the entries
used least recently are removed until it fits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import atomic_file

CACHE_ENV = "FEDLORA_CACHE_DIR"
MAX_MB_ENV = "FEDLORA_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048.0
OFF_VALUES = ("", "0", "off", "none", "false")
FORMAT_VERSION = 1
_FINGERPRINTS: dict[str, str] = {}  # hash of a serialized tokenizer -> its fingerprint


def cache_dir() -> Path | None:
    """The cache folder, or None when ``FEDLORA_CACHE_DIR`` turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser())
    if not base.is_absolute():  # no usable home directory (some containers): no cache
        return None
    return base / "fedlora" / "encoded"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything that decides the tokenizer's output (None: cannot tell).

    Fast (Rust) tokenizers serialize their whole pipeline (normalizer, pre-tokenizer,
    model with its vocabulary, post-processor with the special tokens); slow ones do not,
    and are not cached. The truncation and padding state in that serialization is set by
    transformers on every call, so it is left out, and the side truncation cuts from is
    taken from the tokenizer instead.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    serialized = backend.to_str()
    wrapper = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'truncation_side', None)}"
    raw = hashlib.sha256(f"{wrapper}|{serialized}".encode()).hexdigest()
    if raw not in _FINGERPRINTS:  # parsing a large vocabulary's JSON is the slow part
        definition = json.loads(serialized)
        for state in ("truncation", "padding"):
            definition.pop(state, None)
        digest = hashlib.sha256(wrapper.encode())
        digest.update(json.dumps(definition, sort_keys=True).encode())
        _FINGERPRINTS[raw] = digest.hexdigest()
    return _FINGERPRINTS[raw]


def content_key(texts: Sequence[str], *, tokenizer: str, max_length: int) -> str:
    """The cache key of tokenizing ``texts`` with the fingerprinted tokenizer."""
    digest = hashlib.sha256(f"fedlora-encoded-v{FORMAT_VERSION}|{tokenizer}|{max_length}|"
                            f"{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def load(key: str) -> list[list[int]] | None:
    """The cached token ids under ``key``, or None (missing, off, or damaged)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as entry:
            ids, offsets = entry["ids"], entry["offsets"]
    except Exception:  # noqa: BLE001 - missing or damaged: recomputed, never trusted
        return None
    if not _consistent(ids, offsets):
        return None
    try:
        os.utime(path)  # recently used: the last to be pruned
    except OSError:
        pass
    bounds, flat = offsets.tolist(), ids.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _consistent(ids: np.ndarray, offsets: np.ndarray) -> bool:
    if ids.ndim != 1 or offsets.ndim != 1 or len(offsets) == 0:
        return False
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(offsets.dtype, np.integer)):
        return False
    if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        return False
    return not (len(ids) and ids.min() < 0)


def save(key: str, input_ids: Sequence[Sequence[int]]) -> None:
    """Store token ids under ``key`` (atomically; a failure to write is ignored)."""
    folder = cache_dir()
    if folder is None:
        return
    lengths = np.fromiter((len(row) for row in input_ids), dtype=np.int64, count=len(input_ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for row in input_ids for t in row), dtype=np.int32,
                      count=int(offsets[-1]))
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_file(folder / f"{key}.npz", mode=0o600) as fh:
            np.savez(fh, ids=ids, offsets=offsets)
        prune(folder, keep=folder / f"{key}.npz")
    except OSError:
        return


def max_bytes() -> float:
    """The size the cache folder is kept under (``FEDLORA_CACHE_MAX_MB``, in megabytes)."""
    value = os.environ.get(MAX_MB_ENV, "")
    try:
        megabytes = float(value) if value.strip() else DEFAULT_MAX_MB
    except ValueError:
        raise ValueError(f"{MAX_MB_ENV}={value!r} is not a number of megabytes "
                         f"(default {DEFAULT_MAX_MB:g})") from None
    return max(megabytes, 0.0) * 1e6


def prune(folder: Path, *, keep: Path | None = None) -> None:
    """Remove the least recently used entries until the folder fits :func:`max_bytes`."""
    entries = []
    for path in folder.glob("*.npz"):
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile by another process
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total, limit = sum(size for _, size, _ in entries), max_bytes()
    for _, size, path in sorted(entries, key=lambda e: (e[0], str(e[2]))):
        if total <= limit:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size

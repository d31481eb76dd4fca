"""Files on disk: the one atomic write of fedlora, and where a node keeps its state.

Every file fedlora writes that a reader may open while it is written (keys, pins,
ledgers, results, caches, experiment records) goes through :func:`write_atomic` or
:func:`atomic_file`: a temporary file in the same folder, its permissions set before
any byte, flushed to disk, then ``os.replace``. A reader sees the old file or the whole
new one, never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

STATE_DIR_ENV = "FEDLORA_STATE_DIR"


def state_dir() -> Path:
    """Where a node keeps state that must outlive a run (pins, DP ledgers).

    ``$FEDLORA_STATE_DIR``, else ``$XDG_STATE_HOME/fedlora``, else
    ``~/.local/state/fedlora``. Not created here.
    """
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "fedlora"


@contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` atomically when the block ends without error.

    The folder is created if needed; on error the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, with ``mode`` from the start.

    A private key written with ``mode=0o600`` is never readable by others, even for an
    instant.
    """
    with atomic_file(path, mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)

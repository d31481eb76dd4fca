"""Writing key material to disk: atomically, with the permissions set before any byte."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file (given ``mode`` first) and ``os.replace``.

    A reader sees the old file or the whole new one, never a partial key, and a private
    key is never readable by others even for an instant.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise

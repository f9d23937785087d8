"""Files that must survive a crash at any instant: written whole or not at all, and on disk.

A file is written to a temporary name in its folder, flushed and fsynced, renamed over its
final name (atomic on POSIX), and the folder is fsynced so that the rename itself is durable.
A crash leaves either the old file or the new one, never a torn one. Arrays are stored as
``.npz`` with a SHA-256 over their names, dtypes, shapes and bytes, checked on every load, so
a file damaged after it was written is detected rather than trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DOCUMENT, CHECKSUM = "__document__", "__sha256__"


class CorruptFile(ValueError):
    """A durable file that cannot be read back as it was written."""


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, previous: Path | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably; with ``previous``, the file it
    replaces is kept there (one generation back) instead of being overwritten. The temporary
    file is the writing thread's own: two threads of a process may write one file at once
    (the mirror's and the ServerApp's ``tracking.json``), and the last rename wins whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def digest(arrays: Mapping[str, np.ndarray], document: bytes) -> str:
    """SHA-256 over the document and every array's name, dtype, shape and bytes."""
    sha = hashlib.sha256(document)
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        sha.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray], document: Mapping[str, Any],
                previous: Path | None = None) -> Path:
    """``arrays`` and a JSON ``document`` as one checksummed ``.npz`` (no pickle), durably
    (``previous``: see :func:`write_bytes`)."""
    for reserved in (DOCUMENT, CHECKSUM):
        if reserved in arrays:
            raise ValueError(f"array name {reserved!r} is reserved")
    text = json.dumps(document).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **{DOCUMENT: np.frombuffer(text, np.uint8),
                        CHECKSUM: np.frombuffer(digest(arrays, text).encode(), np.uint8)},
             **arrays)
    return write_bytes(path, buffer.getvalue(), previous)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`save_arrays` wrote; :class:`CorruptFile` if it is damaged or not one
    (FileNotFoundError if there is none)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptFile(f"{path}: {err}") from None
    text, checksum = files.pop(DOCUMENT, None), files.pop(CHECKSUM, None)
    if text is None or checksum is None:
        raise CorruptFile(f"{path}: no document or checksum")
    if digest(files, text.tobytes()) != checksum.tobytes().decode(errors="replace"):
        raise CorruptFile(f"{path}: checksum mismatch")
    try:
        return files, json.loads(text.tobytes())
    except ValueError as err:
        raise CorruptFile(f"{path}: {err}") from None

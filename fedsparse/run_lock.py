"""One run at a time in a run folder: an exclusive ``flock`` on ``<run_dir>/.lock``.

``fedsparse run`` (fresh or ``--resume``) takes the lock before it starts anything and
passes its descriptor to the supervisors of the run's processes (``supervise.py``), which
keep it open until their whole process tree is gone. A resume therefore never races
processes of an earlier run that are still stopping, even when that run's CLI was killed.
The file holds the pid of the process that took the lock, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE = ".lock"


class RunDirBusy(RuntimeError):
    """Another run holds the run folder."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__(f"{run_dir} is in use by pid {holder or '(unknown)'} "
                         f"(or by processes it started, which are stopping); try again later")
        self.run_dir = run_dir
        self.holder = holder


@contextmanager
def hold(run_dir: Path) -> Iterator[int]:
    """Lock ``run_dir`` (created if missing) for this process; yield the lock's descriptor,
    which children given it (``pass_fds``) hold too. Raise :class:`RunDirBusy` at once when
    the folder is locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(run_dir, os.read(fd, 32).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def in_use(run_dir: Path) -> bool:
    """Whether a run holds ``run_dir`` now, found without taking its lock or writing to the
    folder (it may be read-only): a shared lock is refused while a run holds the exclusive
    one. (A ``--resume`` starting in the instant the shared lock is held is refused as busy.)"""
    try:
        fd = os.open(run_dir / FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

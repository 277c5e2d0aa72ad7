"""One run per run folder: an advisory lock held while a process trains into it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfkd.errors import RunLockedError

__all__ = ["run_lock"]


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``<folder>/.lock`` exclusively while this process trains into ``folder``.

    An advisory ``flock``: the operating system drops it when the process ends,
    however it ends, so a crash never leaves a stale lock behind. Two runs in
    one folder would interleave their checkpoints and metrics; the second one
    is refused instead. Where ``fcntl`` does not exist (Windows), runs are not
    guarded.

    Raises:
        RunLockedError: another process holds the folder, named by its pid and host.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunLockedError(
                f"{owner} is training into {str(folder)!r}: one run folder takes one run at a time. Wait for it, "
                "or choose another output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""One writer per run directory: `train` holds RUN/.lock while it writes there.

The lock is an advisory `flock` on the file, not the file's existence: the kernel drops it when its
process ends however it ends (kill -9 included), so a lock left by a dead run is simply taken over, with
no PID-liveness guessing (a PID can be reused; a host name does not say whose PID it is). The file's text
names the holder, only for the message a second process prints.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

from transferlab.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows: no flock; a run directory is then not protected (see `RunLock.acquire`)
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on `run_dir` for this process: `acquire()` raises RunDirError
    naming the holder when another live process has it; `release()` (or the process ending) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by a live process
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "a process that has not said"
            os.close(fd)
            raise RunDirError(
                f"'{self.path.parent}' is in use: another transferlab process is writing into it ({holder}). "
                "Wait for it to finish (or stop it), or choose another --out."
            ) from None
        # Taken (fresh, or left by a process that has ended): say who holds it now.
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays, unlocked
            self._fd = None

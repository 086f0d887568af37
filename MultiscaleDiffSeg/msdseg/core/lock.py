"""One run at a time per output folder: ``OUTDIR/.msdseg-lock``, held with an operating-system lock.

Why: every file of a case is committed atomically, but two runs writing one folder would still
interleave a case (both see it unfinished, both segment it, their commits and provenance records
cross), and the start-of-run clean-up of one run would restore or remove the other's hidden
temporaries.  So a run holds an exclusive lock on the folder from before its clean-up until its last
cohort file is written.

A second run is **refused at once** with one line naming the holder (pid, host, start time) rather
than made to wait: a run that silently waits looks like a hang, and queueing runs is better done
explicitly by a person or a scheduler.

The lock is ``fcntl.flock`` (Linux, macOS) or ``msvcrt.locking`` (Windows) on the open lock file.
The operating system drops it when the holding process ends in any way -- SIGKILL and out-of-memory
kills included -- so a lock file left behind by a dead run is simply taken over: no pid has to be
guessed alive or dead, and a reused pid cannot keep a folder locked.  On NFS, Linux turns flock
into byte-range locks that the server arbitrates, so runs on two hosts exclude each other too.  The
file is removed when the run ends, so a finished folder holds only results.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from msdseg.core.errors import InputError

LOCK_NAME = ".msdseg-lock"

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class FolderBusy(InputError):
    """Another live run holds the output folder's lock."""


class FolderLock:
    """Exclusive lock on an output folder for the life of one run (a context manager).

    ``enforced`` is False when the file system offers no locking at all (then runs are not
    protected from each other, and the caller may say so).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.enforced = True
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock or raise :class:`FolderBusy` naming the run that holds it."""
        for _ in range(20):  # a holder may remove the file between our open and our lock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = _try_lock(fd)
            except OSError:  # no locking on this file system: go on unprotected
                self.enforced, self._fd = False, fd
                return self
            if not taken:
                os.close(fd)
                holder = self._holder()
                if holder is None:
                    continue  # released while we looked: try again
                raise FolderBusy(f"{self.folder}: another msdseg run is writing to this folder ({holder}); "
                                 "wait for it to end or choose another output folder")
            if self._same_file(fd):
                self._fd = fd
                self._write_owner()
                return self
            os.close(fd)  # we locked a file its holder had just removed: start over on the new one
        raise FolderBusy(f"{self.folder}: could not take the lock {LOCK_NAME} (it keeps changing)")

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so no one locks a removed file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._same_file(fd):
                self.path.unlink()
        except OSError:  # Windows cannot remove an open file: it stays, unlocked, for the next run
            pass
        try:
            _unlock(fd)
        except OSError:
            pass
        os.close(fd)
        if os.name == "nt":  # remove it now that it is closed; fails if another run holds it open
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # ------------------------------------------------------------------ helpers
    def _same_file(self, fd: int) -> bool:
        try:
            mine, now = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def _write_owner(self) -> None:
        assert self._fd is not None
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = (json.dumps(owner) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def _holder(self) -> str | None:
        """``pid N on HOST since T`` from the lock file, or None when the lock is free by now."""
        for _ in range(10):  # the holder writes its name just after locking: give it a moment
            try:
                owner = json.loads(self.path.read_text(encoding="utf-8") or "null")
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                owner = None
            if isinstance(owner, dict):
                return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"
            time.sleep(0.05)
        return "a run that did not record its pid"


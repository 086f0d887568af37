"""Atomic file output: a reader never sees a half-written file, a failed case leaves nothing new.

Why: batch runs are resumed by checking which outputs exist (``outputs.outputs_complete``).  A crash,
a full disk or a cancel in the middle of writing must therefore never leave a file that *looks*
finished.  Every file is written under a hidden temporary name in the destination folder (same file
system, so ``os.replace`` is atomic), flushed to disk, then renamed.  :class:`OutputGroup` extends
this to the several files of one case: all are renamed into place only after every one was written,
and if anything fails (including ``KeyboardInterrupt`` / cancellation) the new files are removed and
any files they were replacing are put back.

Temporary names keep the final name as their *suffix* (``.msdseg-tmp-<token>-S_labels.nii.gz``)
because writers such as SimpleITK choose the file format from the extension.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from types import TracebackType
from typing import Collection, Iterator

TMP_PREFIX = ".msdseg-tmp-"
BACKUP_PREFIX = ".msdseg-bak-"


def temporary_path(final: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``final`` that ends with ``final``'s name (keeps its suffixes)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{secrets.token_hex(6)}-{final.name}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk (writers like SimpleITK do not fsync themselves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist renames in a folder; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically.

    On any exception the temporary file is deleted and ``final`` is untouched.
    """
    final = Path(final)
    tmp = temporary_path(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer did not create the file")
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically (``newline=''`` semantics: text is written as given)."""
    return atomic_write_bytes(final, text.encode(encoding))


class OutputGroup:
    """All-or-nothing set of output files of one case.

    Usage::

        with OutputGroup(outdir) as group:
            sitk.WriteImage(img, group.path("S_labels.nii.gz"))
            write_csv(group.path("S_volumes.csv"))
        # here both files exist under their final names, or neither does

    Commit is two-phase: every file is written and fsynced first; then existing files with the same
    names are moved aside, the new ones renamed in, and the old ones deleted.  If any step fails the
    already renamed new files are removed and the old ones restored, so the folder is as before.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._pending: dict[Path, Path] = {}  # final -> temporary
        self.committed: list[Path] = []

    def path(self, name: str) -> Path:
        """Temporary path to write the output called ``name`` (a file name inside the folder)."""
        final = self.directory / name
        if final in self._pending:
            raise ValueError(f"output {name} registered twice")
        tmp = temporary_path(final)
        self._pending[final] = tmp
        return tmp

    def __enter__(self) -> "OutputGroup":
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.discard()
            return None
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise
        return None

    def discard(self) -> None:
        """Delete every temporary file not yet committed."""
        for tmp in self._pending.values():
            _unlink_quietly(tmp)
        self._pending.clear()

    def commit(self) -> list[Path]:
        """Move every written file into place, all or nothing."""
        for final, tmp in self._pending.items():
            if not tmp.exists():
                raise FileNotFoundError(f"{final.name}: the writer did not create the file")
            fsync_file(tmp)
        backups: dict[Path, Path] = {}
        done: list[Path] = []
        try:
            for final in self._pending:
                if final.exists():
                    backup = final.with_name(f"{BACKUP_PREFIX}{secrets.token_hex(6)}-{final.name}")
                    os.replace(final, backup)
                    backups[final] = backup
            for final, tmp in self._pending.items():
                os.replace(tmp, final)
                done.append(final)
        except BaseException:
            for final in done:
                _unlink_quietly(final)
            for final, backup in backups.items():
                with contextlib.suppress(OSError):
                    os.replace(backup, final)
            raise
        for backup in backups.values():
            _unlink_quietly(backup)
        fsync_dir(self.directory)
        self._pending.clear()
        self.committed = done
        return done


def remove_stale_temporaries(directory: str | os.PathLike, older_than_s: float = 3600.0,
                             names: Collection[str] | None = None) -> list[Path]:
    """Delete temporaries left by a killed process (``SIGKILL`` skips every cleanup).

    Only files older than ``older_than_s`` go, so a concurrent writer's live temporaries survive.
    ``names`` limits the clean-up to the temporaries and backups of these final file names: the
    files of one case whose worker is known to be dead, cleaned at once (``older_than_s=0``) while
    other cases are still being written.
    A commit's backup (``.msdseg-bak-<token>-NAME``) is never deleted for its age: it may be the
    only copy of an earlier output (a kill between moving the old file aside and renaming the new
    one in).  When ``NAME`` is missing it is put back; otherwise it stays for a person to look at.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now = time.time()
    removed: list[Path] = []
    for p in directory.iterdir():
        if not p.is_file() or not p.name.startswith((BACKUP_PREFIX, TMP_PREFIX)):
            continue
        if names is not None and _final_name(p.name) not in names:
            continue
        if p.name.startswith(BACKUP_PREFIX):
            final = directory / _final_name(p.name)
            if not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(p, final)
        elif p.name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                if older_than_s <= 0 or now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed.append(p)
    return removed


def _final_name(hidden: str) -> str:
    """``.msdseg-tmp-<token>-NAME`` or ``.msdseg-bak-<token>-NAME`` -> ``NAME``."""
    prefix = BACKUP_PREFIX if hidden.startswith(BACKUP_PREFIX) else TMP_PREFIX
    return hidden[len(prefix):].split("-", 1)[-1]

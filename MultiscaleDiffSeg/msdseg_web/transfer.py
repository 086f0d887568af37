"""Uploads arrive in slices; each browser connection gets its own files on disk and a size cap.

Why not collect whole files in memory: the page sends a file as one message per slice
(``upload.js``), so the server never holds more than one slice of it, and the bytes go straight
to a private folder.  Every upload is keyed by the WebSocket connection that started it: slices
from another connection, out of order, beyond the sizes announced at the start, or beyond the
total cap (``--max-upload-mb``, counted over all unfinished uploads of a connection) end the
upload with one line and delete what it wrote.  File I/O is left to the caller's executor, so a
slow disk never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from msdseg.core.errors import InputError

from .uploads import safe_file_name

#: Default total upload size: a 512^3 float32 volume (the largest the core accepts is 512^3
#: voxels) is 512 MiB, and a detached header may come with a second copy of the data.
DEFAULT_MAX_UPLOAD_MB = 1024
#: At most this many files in one upload (a header and its data file, with room to spare).
MAX_FILES = 8
#: Unfinished uploads older than this are dropped when the same connection starts another.
STALE_SECONDS = 3600.0
#: Largest message a browser may send: one upload slice (8 MiB) with room for its envelope.
MAX_MESSAGE_BYTES = 32 * 2**20


def cap_websocket_messages(max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Limit every incoming wslink message to ``max_bytes``.

    Why: wslink lets a connection that has said hello send one message of up to 4 GB, and it
    allocates the whole message on its first chunk.  Uploads come in slices, so no honest message
    is larger than a slice; this swaps wslink's per-connection reassembler for one whose limit
    cannot be raised above ``max_bytes`` (a larger message ends the connection).
    """
    import wslink.chunking
    import wslink.protocol

    base = wslink.chunking.UnChunker

    class CappedUnChunker(base):  # type: ignore[misc, valid-type]
        def set_max_message_size(self, size: int) -> None:
            super().set_max_message_size(min(int(size), max_bytes))

    CappedUnChunker.__name__ = "CappedUnChunker"
    wslink.protocol.UnChunker = CappedUnChunker


T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run blocking work (reading, decoding, writing files) in a worker thread.

    Why: the event loop serves every connection and renders the views; a T1 takes a second or
    more to decompress and check, and the page (or another connection) must not freeze meanwhile.
    """
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def upload_limit_error(total: int, limit: int) -> InputError:
    return InputError(f"upload too large: {total / 2**20:.0f} MB, the limit is {limit / 2**20:.0f} MB "
                      f"(msdseg web --max-upload-mb)")


@dataclass
class PendingUpload:
    """One selection of files being received: the announced sizes and what arrived so far."""

    client: str
    folder: Path
    names: list[str]
    sizes: list[int]
    received: list[int]
    started: float

    @property
    def declared(self) -> int:
        return sum(self.sizes)

    def complete(self) -> bool:
        return self.received == self.sizes


@dataclass
class UploadReceiver:
    """Keeps unfinished uploads apart by connection, caps their size, writes slices to disk."""

    root: Path
    max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
    clock: Callable[[], float] = time.monotonic
    _pending: dict[tuple[str, str], PendingUpload] = field(default_factory=dict, repr=False)

    def begin(self, client: str, upload_id: str, files: list[dict[str, Any]]) -> None:
        """Announce an upload: names and sizes.  Refused before any byte arrives when too large."""
        self._drop_stale(client)
        if not files:
            raise InputError("no file was received")
        if len(files) > MAX_FILES:
            raise InputError(f"too many files in one upload ({len(files)}; at most {MAX_FILES})")
        sizes = [int(f.get("size", -1)) for f in files]
        if min(sizes) < 0:
            raise InputError("upload refused: a file size is missing")
        names = [safe_file_name(str(f.get("name", ""))) for f in files]
        if len(set(names)) != len(names):
            raise InputError(f"upload refused: two files with the same name ({', '.join(names)})")
        self.discard(client, upload_id)
        total = sum(sizes) + self.pending_bytes(client)
        if total > self.max_bytes:
            raise upload_limit_error(total, self.max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix="upload_"))
        self._pending[(client, upload_id)] = PendingUpload(client, folder, names, sizes, [0] * len(sizes),
                                                           self.clock())

    def add(self, client: str, upload_id: str, index: int, offset: int, content: bytes) -> None:
        """Append one slice (blocking file I/O: call it from an executor)."""
        upload = self._get(client, upload_id)
        try:
            if not 0 <= index < len(upload.sizes):
                raise InputError(f"upload refused: there is no file number {index}")
            if offset != upload.received[index]:
                raise InputError(f"upload refused: {upload.names[index]} arrived out of order")
            if offset + len(content) > upload.sizes[index]:
                raise InputError(f"upload refused: {upload.names[index]} is larger than announced")
            with open(upload.folder / upload.names[index], "ab") as handle:
                handle.write(content)
            upload.received[index] += len(content)
        except BaseException:
            self.discard(client, upload_id)
            raise

    def finish(self, client: str, upload_id: str) -> tuple[Path, list[Path]]:
        """The folder and files of a complete upload; the caller deletes the folder when done."""
        upload = self._get(client, upload_id)
        del self._pending[(client, upload_id)]
        if not upload.complete():
            shutil.rmtree(upload.folder, ignore_errors=True)
            missing = [n for n, r, s in zip(upload.names, upload.received, upload.sizes) if r != s]
            raise InputError(f"upload incomplete: {', '.join(missing)} did not arrive in full")
        paths = [upload.folder / name for name in upload.names]
        for path in paths:
            path.touch()  # an empty file sends no slice
        return upload.folder, paths

    def discard(self, client: str | None = None, upload_id: str | None = None) -> None:
        """Forget unfinished uploads (of one connection, or one upload) and delete their files."""
        for key in list(self._pending):
            if (client is None or key[0] == client) and (upload_id is None or key[1] == upload_id):
                shutil.rmtree(self._pending.pop(key).folder, ignore_errors=True)

    def pending_bytes(self, client: str) -> int:
        """Bytes announced by a connection's unfinished uploads (what the cap counts)."""
        return sum(u.declared for (c, _), u in self._pending.items() if c == client)

    def _get(self, client: str, upload_id: str) -> PendingUpload:
        upload = self._pending.get((client, upload_id))
        if upload is None:
            raise InputError("upload refused: it was not started by this browser, or it was cancelled")
        return upload

    def _drop_stale(self, client: str) -> None:
        now = self.clock()
        for key, upload in list(self._pending.items()):
            if key[0] == client and now - upload.started > STALE_SECONDS:
                self.discard(*key)

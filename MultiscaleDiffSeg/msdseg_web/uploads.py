"""Browser uploads -> files on disk -> a validated image, or a one-line reason why not.

Why not trame-slicer's ``write_client_files_to_dir``: it joins the client-supplied file name to
the folder as is, so a name such as ``../../x`` would write outside it.  Here only the base name
is kept, and a file is accepted as a T1 only when :func:`msdseg.core.io.read_image` accepts it (the
same validation as the command line: 3-D, finite, sane spacing, not empty or truncated).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.io import IMAGE_SUFFIXES, load_volume

#: Detached-header formats: their header is the file to open, the data file comes along.
HEADER_SUFFIXES = (".nhdr", ".mhd")


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


def receive_t1(files: list[dict[str, Any]], folder: Path) -> tuple[Path, sitk.Image]:
    """Uploaded files -> (path, float32 image); :class:`InputError` names what is wrong."""
    path = pick_image_file(write_uploads(files, folder))
    return path, load_volume(path)


def receive_result(files: list[dict[str, Any]], folder: Path) -> Path:
    """Uploaded files -> path of a ``.seg.nrrd`` or labels image (read by :mod:`.results`)."""
    return pick_image_file(write_uploads(files, folder))

"""Does an image file hold all the data its header promises?  One line saying "truncated" if not.

Why: a copy cut short (a full disk, an interrupted transfer) is the commonest broken input, and the
readers say so badly: ITK's MetaImage reader prints two raw lines of its own on stderr before it
fails, its NRRD reader fails with a five-line chain, and its NIfTI reader quietly pads a short file
with zeros.  The header tells how many bytes the voxels take, so the check is cheap:

* :func:`missing_bytes` -- before any voxel is read: uncompressed MHA/MHD, NRRD/NHDR and NIfTI
  data, and compressed MHA data (its header records the compressed size), against the file size;
  a file that ends inside its header;
* :func:`compressed_stream_cut` -- only after a reader failed: whether a gzip/zlib stream (``.nii.gz``,
  ``.mgz``, gzip-encoded NRRD, compressed MHA without a recorded size) ends before its end marker.
  That means unpacking it, which is why it is not run on every read.

Both give one line such as ``file is truncated: 733,209 of 1,100,385 bytes of image data
present``, or None when nothing is missing or the layout is one this module does not know (then
the reader's own error stands).
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

_HEADER_BYTES = 1 << 16  # MetaImage and NRRD headers are text of a few hundred bytes to a few KB

_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_NRRD_SIZES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
        "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
        "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_SIZE = {name: size for size, names in _NRRD_SIZES.items() for name in names}


@dataclass(frozen=True)
class Shortfall:
    """What is missing, in one line; ``in_header`` when the file ends before its header does."""

    text: str
    in_header: bool = False


def _short(present: int, expected: int, what: str = "image data") -> Shortfall:
    return Shortfall(f"file is truncated: {present:,} of {expected:,} bytes of {what} present")


# ----------------------------------------------------------------------------- header parsing
def _text_header(path: Path, end_key: str | None) -> tuple[dict[str, str], int, bool]:
    """``key -> value`` of a MetaImage (``end_key`` = ElementDataFile) or NRRD (blank line) header,
    the byte offset where data start, and whether the header's end was found."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    fields: dict[str, str] = {}
    offset = 0
    for raw in head.splitlines(keepends=True):
        offset += len(raw)
        if not raw.endswith(b"\n"):
            break  # a last line without its newline: the header was cut here
        line = raw.decode("latin-1").strip()
        if end_key is None and line == "":
            return fields, offset, True
        sep = "=" if end_key else ":"
        if line.startswith("#") or sep not in line or (not end_key and ":=" in line):
            continue
        key, value = line.split(sep, 1)
        key = key.strip() if end_key else key.strip().lower()
        fields[key] = value.strip()
        if end_key and key == end_key:
            return fields, offset, True
    return fields, offset, False


def _size_beyond(path: Path, offset: int) -> int:
    return max(0, path.stat().st_size - offset)


def _detached(header: Path, name: str) -> Path | None:
    """A single detached data file (``LIST`` and numbered file patterns are left to the reader)."""
    if not name or name.upper() == "LIST" or "%" in name or " " in name.strip():
        return None
    p = Path(name)
    return p if p.is_absolute() else header.parent / p


# ----------------------------------------------------------------------------- per format
def _metaimage(path: Path) -> Shortfall | None:
    fields, offset, complete = _text_header(path, "ElementDataFile")
    if not complete:
        if "NDims" in fields or "ObjectType" in fields:
            return Shortfall("file is truncated: its MetaImage header ends before the ElementDataFile line", True)
        return None
    try:
        count = math.prod(int(n) for n in fields["DimSize"].split())
        count *= int(fields.get("ElementNumberOfChannels", "1"))
        expected = count * _MET_SIZES[fields["ElementType"]]
        header_size = int(fields.get("HeaderSize", "0"))
    except (KeyError, ValueError):
        return None
    if header_size < 0:
        return None  # data at the end of the file: nothing to compare
    source = fields["ElementDataFile"]
    if source.upper() != "LOCAL":
        data = _detached(path, source)
        if data is None or not data.is_file():
            return None
        path, offset = data, 0
    present = _size_beyond(path, offset + header_size)
    if fields.get("CompressedData", "False").lower() == "true":
        packed = fields.get("CompressedDataSize")
        if packed and packed.isdigit():
            return _short(present, int(packed), "compressed image data") if present < int(packed) else None
        return None
    return _short(present, expected) if present < expected else None


def _nrrd(path: Path) -> Shortfall | None:
    fields, offset, complete = _text_header(path, None)
    source = fields.get("data file", fields.get("datafile", ""))
    if not complete and not source:
        if "sizes" in fields or "type" in fields:
            return Shortfall("file is truncated: its NRRD header ends before the image data", True)
        return None
    encoding = fields.get("encoding", "")
    try:
        expected = math.prod(int(n) for n in fields["sizes"].split()) * _NRRD_SIZE[fields["type"]]
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        lines = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError):
        return None
    if encoding != "raw" or skip < 0 or lines:
        return None
    if source:
        data = _detached(path, source)
        if data is None or not data.is_file():
            return None
        path, offset = data, 0
    present = _size_beyond(path, offset + skip)
    return _short(present, expected) if present < expected else None


def _nifti(path: Path) -> Shortfall | None:
    size = path.stat().st_size
    if size < 348:
        return Shortfall(f"file is truncated: {size:,} bytes, shorter than a NIfTI header (348)", True)
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
        offset = int(header.get_data_offset())
        expected = math.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - not a header nibabel understands: the reader's error stands
        return None
    present = max(0, size - offset)
    return _short(present, expected) if present < expected else None


def missing_bytes(path: str | os.PathLike) -> Shortfall | None:
    """From the header and the file size alone: what is missing, or None (see the module doc)."""
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".mha", ".mhd")):
            return _metaimage(p)
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd(p)
        if name.endswith(".nii"):
            return _nifti(p)
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- compressed streams
def _stream_end(fh, wbits: int) -> tuple[bool, int]:  # type: ignore[no-untyped-def]
    """Unpack a zlib/gzip stream from ``fh`` (in bounded pieces); did it reach its end marker?"""
    unpacker = zlib.decompressobj(wbits)
    unpacked = 0
    while True:
        chunk = fh.read(1 << 20)
        if not chunk:
            return unpacker.eof, unpacked
        while chunk:
            unpacked += len(unpacker.decompress(chunk, 1 << 24))
            if unpacker.eof:
                return True, unpacked
            chunk = unpacker.unconsumed_tail


def compressed_stream_cut(path: str | os.PathLike) -> str | None:
    """After a read failed: a gzip or zlib stream in the file that ends early, as one line, or None."""
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith(".mha"):
            fields, offset, complete = _text_header(p, "ElementDataFile")
            packed = complete and fields.get("CompressedData", "").lower() == "true"
        elif name.endswith(".nrrd"):
            fields, offset, complete = _text_header(p, None)
            packed = complete and fields.get("encoding") in ("gzip", "gz")
        else:  # .nii.gz, .mgz, ...: the whole file is one gzip stream
            with open(p, "rb") as fh:
                offset, packed = 0, fh.read(2) == b"\x1f\x8b"
        if not packed:
            return None
        with open(p, "rb") as fh:
            fh.seek(offset)
            ended, unpacked = _stream_end(fh, 47)  # 32 + 15: gzip or zlib, told apart by the stream
    except zlib.error as exc:
        return f"file is corrupt: its compressed data cannot be unpacked ({exc})"
    except OSError:
        return None
    if ended:
        return None
    return f"file is truncated: its compressed data end early ({unpacked:,} bytes unpacked)"

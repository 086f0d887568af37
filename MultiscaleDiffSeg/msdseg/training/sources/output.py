"""Byte-for-byte reproducible, atomic writers for the prepared data.

Same inputs must give the same files (so a rebuilt data set can be checked by hash): gzip and zip
headers carry timestamps, so we fix them; and a reader (the trainer starting early) must never see
a half-written file, so everything is written to a temporary name and renamed.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype: type | np.dtype) -> bytes:
    """Gzipped NIfTI-1 with sform = qform = ``affine`` (code 2, aligned) and no timestamp."""
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=2)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type | np.dtype) -> None:
    write_atomic(path, nifti_bytes(data, affine, dtype))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed member timestamps and order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in arrays:
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    write_atomic(path, buf.getvalue())


def write_json(path: Path, doc: Any) -> None:
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"))

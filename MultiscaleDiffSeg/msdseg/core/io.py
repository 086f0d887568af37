"""Reading images safely: every failure becomes a one-line :class:`InputError`.

SimpleITK reads NIfTI, NRRD and MHA; FreeSurfer's MGZ goes through nibabel and is converted to a
SimpleITK image (RAS affine -> LPS direction/origin) so the rest of the core sees one image type.
Inputs are only ever read, never modified.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.limits import check_limits
from msdseg.core.truncation import compressed_stream_cut, missing_bytes

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MIN_VOXELS_PER_AXIS = 8


def case_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_image_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike, *, validate: bool = True) -> sitk.Image:
    """Read a 3-D scalar image; raise :class:`InputError` with a one-line reason otherwise."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an image file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty")
    short = missing_bytes(p)  # before any reader runs: ITK's MetaImage reader prints raw lines on a short file
    if short is not None and short.in_header:
        raise InputError(f"{p}: {short.text}")
    try:
        if validate:  # from the header alone: a tiny file may describe a huge volume
            size, spacing = _header_geometry(p)
            check_limits(size, spacing, str(p))
        if short is not None:
            raise InputError(f"{p}: {short.text}")
        if p.name.lower().endswith((".mgz", ".mgh")):
            image = _read_mgz(p)
        else:
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except Exception as exc:  # SimpleITK/nibabel raise many types; the user needs one line.
        reason = compressed_stream_cut(p) or f"cannot be read as an image ({_first_line(exc)})"
        raise InputError(f"{p}: {reason}") from None
    if validate:
        if p.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_finite(p)
        validate_image(image, str(p))
    return image


def _header_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and spacing from the file's header, without reading its voxels."""
    if path.name.lower().endswith((".mgz", ".mgh")):
        import nibabel as nib

        header = nib.load(str(path)).header
        return tuple(int(n) for n in header.get_data_shape()), tuple(float(z) for z in header.get_zooms())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(reader.GetSize()), tuple(reader.GetSpacing())


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0 and pads a truncated file with zeros, so read
    the raw voxels once more with nibabel, which does neither."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - any failure here means the data are incomplete
        reason = compressed_stream_cut(path) or f"truncated or corrupt image data ({_first_line(exc)})"
        raise InputError(f"{path}: {reason}") from None
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputError(f"{path}: image contains NaN or infinite values")


def validate_image(image: sitk.Image, name: str = "image") -> None:
    """Reject what the segmenter cannot work on, naming the problem."""
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        return  # a 3-D volume stored with a singleton 4th axis is handled by squeeze_to_3d
    if dim != 3:
        raise InputError(f"{name}: expected a 3-D image, got {dim}-D (size {image.GetSize()})")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    size = image.GetSize()
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{name}: image is too small ({size}); a brain volume needs at least "
                         f"{MIN_VOXELS_PER_AXIS} voxels along every axis")
    spacing = image.GetSpacing()
    if not all(np.isfinite(spacing)) or min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InputError(f"{name}: absurd voxel spacing {tuple(round(s, 4) for s in spacing)} mm "
                         f"(expected {MIN_SPACING_MM}-{MAX_SPACING_MM} mm)")
    check_limits(size, spacing, name)
    extent = [sz * sp for sz, sp in zip(size, spacing)]
    if max(extent) < 60.0:
        raise InputError(f"{name}: field of view {tuple(round(e) for e in extent)} mm is too small for a brain")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(f"{name}: direction matrix is not a rotation")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: image contains NaN or infinite values")
    if float(arr.max()) == float(arr.min()):
        raise InputError(f"{name}: image is constant ({float(arr.min())}); nothing to segment")


def squeeze_to_3d(image: sitk.Image) -> sitk.Image:
    """Drop a singleton 4th axis (some exporters write 3-D volumes as 4-D with one frame)."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        return sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return image


def load_volume(path: str | os.PathLike) -> sitk.Image:
    """Read + validate + squeeze, as float32: the one call front ends use for a T1 input."""
    image = squeeze_to_3d(read_image(path))
    check_not_label_map(image, str(path))
    return sitk.Cast(image, sitk.sitkFloat32)


#: An integer image with at most this many distinct values is a label map or a mask, not a T1
#: (an 8-bit T1 uses most of its 256 grey levels; FreeSurfer's aseg has about 40 labels).
MAX_LABEL_MAP_VALUES = 64


def check_not_label_map(image: sitk.Image, name: str) -> None:
    """Refuse a segmentation or mask given where a T1 image belongs, instead of segmenting it."""
    if image.GetPixelID() not in _INTEGER_PIXELS:
        return
    arr = sitk.GetArrayViewFromImage(image)
    if len(np.unique(arr.ravel()[::97])) > MAX_LABEL_MAP_VALUES:  # a cheap look settles most T1s
        return
    distinct = len(np.unique(arr))
    if distinct <= MAX_LABEL_MAP_VALUES:
        raise InputError(f"{name}: looks like a label map or mask ({distinct} distinct integer values), "
                         "not a T1-weighted image")


_INTEGER_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                   sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64}


def _read_mgz(path: Path) -> sitk.Image:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))  # MGZ is big-endian; SimpleITK wants native
    if data.ndim != 3:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        else:
            raise InputError(f"{path}: expected a 3-D image, got {data.ndim}-D (shape {data.shape})")
    return image_from_ras_affine(data, img.affine)


def image_from_ras_affine(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from a (i, j, k)-ordered array and its voxel->RAS affine."""
    affine = np.asarray(affine, dtype=float)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in origin])
    return image


def ras_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS millimetre affine of a SimpleITK image (as nibabel would give)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = direction @ np.diag(image.GetSpacing())
    affine = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = flip @ lps
    affine[:3, 3] = flip @ np.array(image.GetOrigin())
    return affine


_ITK_PREFIX = re.compile(r"^(itk::ERROR|ITK ERROR|sitk::ERROR|itk::ExceptionObject)[^:]*:\s*(\w+\(0x[0-9a-f]+\):\s*)?",
                         re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    """The informative line of a reader's error: ITK wraps it in a line naming its own source file,
    and NRRD's chain ends with the actual reason."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception thrown in SimpleITK")]
    nrrd = [line.split(": ", 1)[-1] for line in lines if line.startswith("[nrrd]")]
    msg = nrrd[-1] if nrrd else (_ITK_PREFIX.sub("", lines[0]) if lines else "")
    return (msg.strip() or type(exc).__name__)[:200]

"""Bring label maps onto the canonical grid: RAS axes, 1 mm, cropped around the labels.

Array axis 0 runs towards the Right, 1 Anterior, 2 Superior, as in :mod:`msdseg.core.geometry`, so the
image synthesiser never has to think about orientation.  Axis-aligned 1 mm inputs (all current
sources) are only transposed and flipped, which is exact; anything else is resampled with nearest
neighbour.  The world position of every voxel is kept: the affine changes with the array, never the
anatomy, so left stays left (:func:`check_left_is_left` verifies it on every map).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

MARGIN_MM = 8


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transpose/flip the first three axes so that the affine is closest to RAS (lossless)."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, data.shape[:3])


def is_ras_1mm(affine: np.ndarray, tol: float = 1e-4) -> bool:
    return bool(np.allclose(affine[:3, :3], np.eye(3), atol=tol))


def resample_nearest_1mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling onto a 1 mm RAS grid covering all non-zero voxels."""
    idx = np.argwhere(data != 0)
    if idx.size == 0:
        raise ValueError("empty label map")
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    lo_v, hi_v = idx.min(0) - 0.5, idx.max(0) + 0.5
    box = lo_v + corners * (hi_v - lo_v)
    world = nib.affines.apply_affine(affine, box)
    origin = np.floor(world.min(0))
    shape = tuple(int(s) for s in np.ceil(world.max(0) - origin) + 1)
    target = np.eye(4)
    target[:3, 3] = origin
    vox = np.linalg.inv(affine) @ target  # target voxel -> source voxel
    out = ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=shape, order=0,
                                   mode="constant", cval=0)
    return out, target


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label map (3-D) on a RAS 1 mm grid; exact when the input is axis-aligned at 1 mm."""
    data, affine = reorient_to_ras(data, affine)
    if is_ras_1mm(affine):
        return data, affine
    return resample_nearest_1mm(data, affine)


def crop_box(mask: np.ndarray, margin: int = MARGIN_MM) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box (lo inclusive, hi exclusive) around ``mask`` plus ``margin``; may leave the array."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("nothing labelled to crop around")
    return idx.min(0) - margin, idx.max(0) + 1 + margin


def apply_box(data: np.ndarray, affine: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Crop (and zero-pad where the box leaves the array) the first three axes of ``data``."""
    shape = np.array(data.shape[:3])
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    out = np.full(tuple(int(v) for v in hi - lo) + data.shape[3:], fill, dtype=data.dtype)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        data[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    new_affine = affine.copy()
    new_affine[:3, 3] = nib.affines.apply_affine(affine, lo)
    return out, new_affine


def resample_image(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                   target_affine: np.ndarray) -> np.ndarray:
    """Linear resampling of an intensity image onto a target grid (float32).

    When the source is finer than the target, a Gaussian prefilter whose variance matches a box
    of one target voxel stands in for partial-volume averaging, so the result looks like a scan
    acquired at the target spacing rather than an aliased subsample.
    """
    vox = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    src = np.asarray(data, np.float32)
    step = np.abs(vox[:3, :3]).max(axis=1)  # target spacing in source voxels, per source axis
    sigma = np.sqrt(np.maximum(step ** 2 - 1.0, 0.0) / 12.0)
    if np.any(sigma > 0.05):
        src = ndimage.gaussian_filter(src, sigma)
    return ndimage.affine_transform(src, vox[:3, :3], vox[:3, 3], output_shape=tuple(shape), order=1,
                                    mode="constant", cval=0.0).astype(np.float32)


def check_left_is_left(mapped: np.ndarray, affine: np.ndarray, left: set[int], right: set[int]) -> dict[str, float]:
    """Raise unless left structures lie at smaller RAS x than the brain centre and right ones at larger.

    Returns the three RAS x values (mm) for the record.
    """
    def centroid_x(mask: np.ndarray) -> float:
        if not mask.any():
            raise ValueError("laterality check: a side has no voxel")
        return float(nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))[0])

    lx = centroid_x(np.isin(mapped, list(left)))
    rx = centroid_x(np.isin(mapped, list(right)))
    cx = centroid_x(np.isin(mapped, list(left | right)))
    if not lx < cx < rx:
        raise ValueError(f"laterality check failed: left x={lx:.1f}, centre x={cx:.1f}, right x={rx:.1f}")
    return {"left_x": lx, "centre_x": cx, "right_x": rx}

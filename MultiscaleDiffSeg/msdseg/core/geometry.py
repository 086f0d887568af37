"""The canonical model grid and the transforms between it and any input grid.

The network always sees the head on a RAS-aligned grid (array axis 0 runs towards the Right,
axis 1 Anterior, axis 2 Superior), whatever the file's axis order or direction cosines; so left
stays left.  Each depth of the U-Net is the same field of view at twice the spacing of the one
above, and voxel centres of depth ``d + 1`` are the centres of 2x2x2 blocks of depth ``d``, so
average pooling moves exactly between depths.  Predictions are brought back onto the exact input
grid by evaluating the model-grid probabilities at every input voxel's physical position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from msdseg.core.io import ras_affine

#: Field of view (R, A, S) in mm: holds an adult brain with margin; divisible by 8 mm so every
#: depth from 1 mm to 8 mm has an integer number of voxels.
FOV_MM = (176.0, 208.0, 176.0)
#: Head-top margin: the grid's top sits this far above the highest foreground voxel.
TOP_MARGIN_MM = 8.0

_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ModelGrid:
    """A RAS-aligned grid: voxel centre of index (i, j, k) is ``origin + spacing * (i, j, k)``."""

    origin_ras: tuple[float, float, float]
    spacing_mm: float
    shape: tuple[int, int, int]

    @classmethod
    def centred(cls, centre_ras: np.ndarray, spacing_mm: float, fov_mm=FOV_MM) -> "ModelGrid":
        shape = tuple(int(round(f / spacing_mm)) for f in fov_mm)
        origin = np.asarray(centre_ras, float) - spacing_mm * (np.array(shape) - 1) / 2.0
        return cls(tuple(float(o) for o in origin), float(spacing_mm), shape)  # type: ignore[arg-type]

    @property
    def centre_ras(self) -> np.ndarray:
        return np.array(self.origin_ras) + self.spacing_mm * (np.array(self.shape) - 1) / 2.0

    def at_spacing(self, spacing_mm: float) -> "ModelGrid":
        """Same field of view and centre at another spacing (the grid of another depth)."""
        fov = tuple(s * self.spacing_mm for s in self.shape)
        return ModelGrid.centred(self.centre_ras, spacing_mm, fov)

    def ras_affine(self) -> np.ndarray:
        aff = np.eye(4)
        aff[:3, :3] *= self.spacing_mm
        aff[:3, 3] = self.origin_ras
        return aff

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image with this grid's geometry (for sitk.Resample)."""
        ref = sitk.Image([int(s) for s in self.shape], pixel_type)
        ref.SetSpacing([self.spacing_mm] * 3)
        ref.SetDirection([float(v) for v in _LPS.ravel()])
        ref.SetOrigin([float(v) for v in _LPS @ np.array(self.origin_ras)])
        return ref

    def coordinates(self, centre_ras: np.ndarray | None = None) -> np.ndarray:
        """RAS position of every voxel centre relative to ``centre_ras`` (default: this grid's
        centre) in units of 100 mm, so about [-1, 1]; (3, X, Y, Z) float32.

        Coordinates are physical rather than index-based, so a training crop (given the full
        grid's centre) and every depth see the same value at the same place.
        """
        centre = self.centre_ras if centre_ras is None else np.asarray(centre_ras, float)
        axes = [
            (o + np.arange(n) * self.spacing_mm - c) / 100.0
            for n, o, c in zip(self.shape, self.origin_ras, centre)
        ]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def to_ras_array(image: sitk.Image) -> np.ndarray:
    """Voxel array of a SimpleITK image in (i, j, k) order (SimpleITK gives (k, j, i))."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def foreground_mask(values: np.ndarray) -> np.ndarray:
    """Rough head/brain mask: above a fraction of the robust maximum, largest component kept."""
    from scipy import ndimage

    hi = np.percentile(values, 99.0)
    lo = np.percentile(values, 1.0)
    mask = values > lo + 0.12 * (hi - lo)
    mask = ndimage.binary_opening(mask, iterations=1)
    labelled, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labelled, index=range(1, n + 1))
        mask = labelled == (1 + int(np.argmax(sizes)))
    return mask


def head_grid(image: sitk.Image, spacing_mm: float, fov_mm=FOV_MM) -> ModelGrid:
    """Place the model grid on the head: centred left-right and front-back on the foreground,
    and vertically either centred (a skull-stripped brain fits) or hung from the top of the head
    (a scan that includes the neck would otherwise push the brain out of the top)."""
    coarse = _coarse_ras_view(image, 4.0)
    mask = foreground_mask(to_ras_array(coarse))
    if not mask.any():
        mask = np.ones(mask.shape, bool)
    idx = np.argwhere(mask)
    aff = ras_affine(coarse)
    pts = idx @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2.0
    centre[2] = max(centre[2], hi[2] + TOP_MARGIN_MM - fov_mm[2] / 2.0)
    return ModelGrid.centred(centre, 4.0, fov_mm).at_spacing(spacing_mm)


def _coarse_ras_view(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The whole image resampled on a RAS grid at ``spacing_mm`` (for cheap geometry decisions)."""
    aff = ras_affine(image)
    size = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    pts = corners @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    shape = np.maximum(np.ceil((hi - lo) / spacing_mm).astype(int) + 1, 2)
    grid = ModelGrid(tuple(lo), spacing_mm, tuple(int(s) for s in shape))
    return resample_to_grid(image, grid, antialias=True)


def resample_to_grid(
    image: sitk.Image, grid: ModelGrid, *, interpolator: int = sitk.sitkLinear, antialias: bool = True
) -> sitk.Image:
    """Resample onto ``grid``; Gaussian pre-smoothing where the grid is coarser than the image
    so that downsampling averages (as a coarser scanner would) instead of aliasing."""
    src = sitk.Cast(image, sitk.sitkFloat32) if interpolator != sitk.sitkNearestNeighbor else image
    if antialias and interpolator != sitk.sitkNearestNeighbor:
        sigmas = [
            0.5 * np.sqrt(max(grid.spacing_mm**2 - s**2, 0.0)) for s in image.GetSpacing()
        ]
        if max(sigmas) > 0.25 * min(image.GetSpacing()):
            src = sitk.SmoothingRecursiveGaussian(src, [max(s, 1e-3) for s in sigmas])
    out = sitk.Resample(src, grid.reference_image(src.GetPixelID()), sitk.Transform(), interpolator, 0.0)
    return out


def normalise_intensities(values: np.ndarray) -> np.ndarray:
    """Map any scanner range to about [0, 1]: 0.5th percentile -> 0, 99th percentile of the
    above-mean voxels (the head) -> 1; clipped to [0, 1.5].  Used identically for synthetic
    training images and real inputs, so the network never sees a different convention."""
    v = values.astype(np.float32, copy=False)
    lo = float(np.percentile(v, 0.5))
    above = v[v > v.mean()]
    hi = float(np.percentile(above, 99.0)) if above.size else float(v.max())
    if hi - lo < 1e-6:
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.5)


def input_index_to_grid_index(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """4x4 matrix taking input voxel indices (i, j, k) to continuous model-grid indices."""
    return np.linalg.inv(grid.ras_affine()) @ ras_affine(image)


def image_on_grid(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """Normalised input intensities on the model grid, (X, Y, Z) float32 in RAS order."""
    return normalise_intensities(to_ras_array(resample_to_grid(image, grid)))


def finer_output_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` on a grid of the same orientation and field of view whose voxel sides are at most
    ``spacing_mm`` (finer axes keep their spacing); intensities interpolated with B-splines.

    Why: a thick-slice scan answered on its own grid has thick-slice labels; on request the labels
    are computed at every voxel of a finer grid over the same box (edges aligned), so volumes and
    borders are those of the anatomy, not of the acquisition.  ``image`` itself if nothing is finer.
    """
    old = np.asarray(image.GetSpacing(), float)
    new = np.minimum(old, float(spacing_mm))
    if np.allclose(new, old):
        return image
    size = np.maximum(np.ceil(np.asarray(image.GetSize()) * old / new - 1e-6).astype(int), 1)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    # the first voxel's outer edge stays where it was: the two boxes cover the same space
    origin = np.asarray(image.GetOrigin(), float) + direction @ (0.5 * (new - old))
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(new.tolist())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(origin.tolist())
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkBSpline, 0.0)

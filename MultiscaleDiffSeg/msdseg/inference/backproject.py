"""Bring model-grid probabilities back onto the exact input grid, slab by slab.

Every input voxel's centre is mapped into the model grid (one affine: input index -> RAS ->
model index) and the probabilities are interpolated trilinearly there, then reduced to an argmax
label and an uncertainty value.  Working in slabs of input slices keeps memory bounded: a
256^3 input never materialises 33 full-resolution probability volumes.

Only the input box that can receive a label is sampled.  Outside the model grid every voxel is
background by definition; and trilinear weights are a convex combination, so where all eight
neighbouring grid voxels have background as their most likely class the interpolated argmax is
background too.  Without an uncertainty map the sampled box is therefore the input-index box of
the grid voxels whose argmax is not background (plus one voxel), which is exact and skips most of
a padded scan (most of a padded scan lies outside the grid).

With an :class:`~msdseg.inference.intensity.IntensityModel` every sampled voxel's probabilities are
combined with its own intensity before the argmax (the scan's detail at its own resolution); the
sampled box then holds every grid voxel whose background probability is below the model's band,
the only voxels the combination can move.

A voxel longer than the model grid's spacing along an axis (a thick slice, a 3 mm scan) is not
labelled from its centre: its best hard label is the argmax of the probabilities averaged over its
extent.  Along such axes each voxel is sampled at :func:`footprint` sub-points no more than
:data:`FOOTPRINT_STEP_MM` apart, their probabilities are averaged, and the label and uncertainty
are read from the average.  With the intensity model every sub-point is combined with the voxel's
own intensity: the scanner already averaged the tissue over the slice profile, so the voxel holds
nothing finer (interpolating between slices invents detail, and scored worse on thick slices).  A
sub-point outside the model grid counts as background.  The slabs hold as many sub-points as they held voxels, so the peak
memory stays where it was; the time grows with the number of sub-points (a 5 mm slice scan costs
about what a 1 mm scan of the same box costs).  The argmax of an average of points that all
prefer background is background, so the sampled box above stays exact.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from msdseg.inference.calibration import error_probability, temper
from msdseg.core.geometry import ModelGrid, input_index_to_grid_index
from msdseg.core.settings import Preset
from msdseg.inference.intensity import BAND, FIT_VOXELS, IntensityModel, draw_fit_voxels, fit_intensity_model, worth_refining

SLAB_VOXELS = 2_000_000
#: along voxel axes longer than the model grid's spacing, sub-points at most this far apart
FOOTPRINT_STEP_MM = 1.0


def footprint(spacing: tuple[float, ...], grid_mm: float) -> tuple[int, int, int]:
    """Sub-points per voxel axis that sample a voxel's extent: 1 along axes no longer than the
    model grid's spacing (the interpolated grid holds nothing finer there), else enough for
    :data:`FOOTPRINT_STEP_MM` (5 along 5 mm slices)."""
    return tuple(int(math.ceil(s / FOOTPRINT_STEP_MM - 1e-6)) if s > grid_mm * (1 + 1e-6) else 1
                 for s in spacing)  # type: ignore[return-value]


def backproject(
    probs: torch.Tensor,
    grid: ModelGrid,
    image: sitk.Image,
    channel_to_label: np.ndarray,
    uncertainty: torch.Tensor | None = None,
    progress: Callable[[float], None] | None = None,
    intensity: IntensityModel | None = None,
    temperature: float | torch.Tensor = 1.0,
) -> tuple[sitk.Image, sitk.Image | None]:
    """Labels (uint16, label numbers) and optional uncertainty (float32) on ``image``'s grid.

    ``probs`` is (C, X, Y, Z) on ``grid``; ``uncertainty`` (1, X, Y, Z) is interpolated likewise.
    Voxels outside the model grid are background with zero uncertainty.  With ``intensity`` the
    labels are the argmax of :meth:`IntensityModel.posterior` at each voxel's own intensity, and the
    uncertainty (when ``uncertainty`` is given, its values are not used) is that posterior's error
    probability at ``temperature``: the uncertainty belongs to the label the user gets.  A
    ``temperature`` field (1, X, Y, Z) on the model grid is interpolated to every voxel.  Voxels
    longer than the grid's spacing are averaged over their extent (:func:`footprint`): the label,
    and with ``intensity`` the uncertainty, come from the averaged probabilities; without it the
    interpolated ``uncertainty`` is averaged.
    """
    size = image.GetSize()  # (i, j, k)
    mat = torch.from_numpy(input_index_to_grid_index(image, grid)).float()
    shape = torch.tensor(grid.shape, dtype=torch.float32)
    vol = probs.float().cpu()[None]  # (1, C, X, Y, Z)
    unc = None if uncertainty is None else uncertainty.float().cpu()[None]
    lut = torch.from_numpy(channel_to_label.astype(np.int64))
    labels_out = np.zeros((size[2], size[1], size[0]), dtype=np.uint16)  # SimpleITK (k, j, i)
    unc_out = np.zeros(labels_out.shape, dtype=np.float32) if unc is not None else None
    whole_grid = ((0, 0, 0), tuple(s - 1 for s in grid.shape))
    band = None if intensity is None else intensity.band
    fp = footprint(image.GetSpacing(), grid.spacing_mm)
    grid_box = _foreground_grid_box(vol[0], band)
    if unc is not None and intensity is not None:
        # Outside the band's box every voxel stays background and its probabilities are the
        # network's: its uncertainty is the grid's calibrated error probability, interpolated
        # (one channel, not the 33 the posterior needs).  The box then gets the full treatment.
        air = error_probability(temper(vol[0], temperature))[None]
        _project_uncertainty(air, mat, shape, _input_box(mat, whole_grid, size), unc_out,
                             _share(progress, 0.0, 0.2), fp)
        progress = _share(progress, 0.2, 1.0)
    elif unc is not None:
        grid_box = whole_grid
    if grid_box is None:  # every grid voxel is background: so is every input voxel
        return _as_image(labels_out, image), None if unc_out is None else _as_image(unc_out, image)
    (i0, j0, k_start), (i1, j1, k_stop) = _input_box(mat, grid_box, size)
    per_slice = (i1 - i0) * (j1 - j0) * fp[0] * fp[1] * fp[2]  # sub-points: what the slab's tensors hold
    # the intensity posterior holds a few more (C, slab) tensors at once: smaller slabs, same peak
    slab = max(1, (SLAB_VOXELS if intensity is None else SLAB_VOXELS // 4) // max(per_slice, 1))
    values = sitk.GetArrayViewFromImage(image) if intensity is not None else None  # (k, j, i)
    averaged = fp != (1, 1, 1)
    for k0, k1, idx in _slabs((i0, j0, k_start), (i1, j1, k_stop), slab, fp):
        p, samp, inside = _interpolate(vol, idx, mat, shape)
        p = p[0]
        if intensity is not None:
            x = torch.from_numpy(np.ascontiguousarray(values[k0:k1, j0:j1, i0:i1].transpose(2, 1, 0), dtype=np.float32))
            if averaged:  # the voxel's own intensity at each of its sub-points
                x = x.repeat_interleave(fp[0], 0).repeat_interleave(fp[1], 1).repeat_interleave(fp[2], 2)
            p = intensity.posterior(p.reshape(p.shape[0], -1), x.reshape(-1)).reshape(p.shape)
        # the temperature at the points, when the refined posterior's uncertainty is asked for
        temp = _at_voxels(temperature, samp) if unc is not None and intensity is not None else None
        if averaged:  # points outside the grid are background; then one average per voxel
            p[:, ~inside] = 0.0
            p[0, ~inside] = 1.0
            p, temp = _pool(p, fp), (_pool(temp, fp) if isinstance(temp, torch.Tensor) else temp)
            u_points = None if unc is None or intensity is not None else _grid_uncertainty(unc, samp, inside)
            inside = _pool(inside[None].float(), fp)[0] > 0
        lab = p.argmax(0)
        lab[~inside] = 0
        labels_out[k0:k1, j0:j1, i0:i1] = lut[lab].numpy().astype(np.uint16).transpose(2, 1, 0)
        if unc is not None and intensity is not None:
            u = error_probability(temper(p, temp))[0]  # type: ignore[arg-type]
            u[~inside] = 0
            unc_out[k0:k1, j0:j1, i0:i1] = u.numpy().transpose(2, 1, 0)  # type: ignore[index]
        elif unc is not None:
            u = _pool(u_points[None], fp)[0] if averaged else _grid_uncertainty(unc, samp, inside)  # type: ignore[index]
            unc_out[k0:k1, j0:j1, i0:i1] = u.numpy().transpose(2, 1, 0)  # type: ignore[index]
        if progress is not None:
            progress((k1 - k_start) / max(k_stop - k_start, 1))
    return _as_image(labels_out, image), None if unc_out is None else _as_image(unc_out, image)


def _slabs(start: tuple[int, int, int], stop: tuple[int, int, int], slab: int, fp: tuple[int, int, int] = (1, 1, 1)):
    """(k0, k1, input indices (I, J, K, 3)) of a half-open input box, ``slab`` slices at a time;
    with footprint ``fp`` the continuous indices of each voxel's sub-points, (I*fi, J*fj, K*fk, 3)."""
    (i0, j0, k_start), (i1, j1, k_stop) = start, stop
    ii, jj = torch.meshgrid(_axis_points(i0, i1, fp[0]), _axis_points(j0, j1, fp[1]), indexing="ij")
    for k0 in range(k_start, k_stop, slab):
        k1 = min(k_stop, k0 + slab)
        kk = _axis_points(k0, k1, fp[2])
        yield k0, k1, torch.stack(
            [ii[..., None].expand(-1, -1, len(kk)), jj[..., None].expand(-1, -1, len(kk)),
             kk.expand(ii.shape[0], ii.shape[1], -1)],
            dim=-1,
        )


def _axis_points(a0: int, a1: int, n: int) -> torch.Tensor:
    """Indices a0..a1-1, or with ``n`` > 1 the centres of n equal parts of each voxel
    (``a + (m + 0.5) / n - 0.5``), voxel by voxel."""
    centres = torch.arange(a0, a1, dtype=torch.float32)
    if n == 1:
        return centres
    return (centres[:, None] + (torch.arange(n, dtype=torch.float32) + 0.5) / n - 0.5).reshape(-1)


def _pool(values: torch.Tensor, fp: tuple[int, int, int]) -> torch.Tensor:
    """Mean over each voxel's sub-points: (C, I*fi, J*fj, K*fk) -> (C, I, J, K)."""
    c, x, y, z = values.shape
    return values.reshape(c, x // fp[0], fp[0], y // fp[1], fp[1], z // fp[2], fp[2]).mean(dim=(2, 4, 6))


def _grid_uncertainty(unc: torch.Tensor, samp: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The grid's uncertainty map (1, 1, X, Y, Z) at a slab's sample points; zero outside the grid."""
    u = F.grid_sample(unc, samp, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    u[~inside] = 0
    return u


def _project_uncertainty(unc: torch.Tensor, mat: torch.Tensor, shape: torch.Tensor, box, out: np.ndarray,
                         progress: Callable[[float], None] | None, fp: tuple[int, int, int] = (1, 1, 1)) -> None:
    """Trilinear values of the one-channel grid map ``unc`` (1, 1, X, Y, Z) at every input voxel of
    ``box`` (half-open, (i, j, k)), written into ``out`` (k, j, i); zero outside the grid; with
    footprint ``fp`` averaged over each voxel's sub-points."""
    (i0, j0, k_start), (i1, j1, k_stop) = box
    slab = max(1, SLAB_VOXELS // max((i1 - i0) * (j1 - j0) * fp[0] * fp[1] * fp[2], 1))
    for k0, k1, idx in _slabs(box[0], box[1], slab, fp):
        u, _, inside = _interpolate(unc, idx, mat, shape)
        u = u[0, 0]
        u[~inside] = 0
        if fp != (1, 1, 1):
            u = _pool(u[None], fp)[0]
        out[k0:k1, j0:j1, i0:i1] = u.numpy().transpose(2, 1, 0)
        if progress is not None:
            progress((k1 - k_start) / max(k_stop - k_start, 1))


def _at_voxels(temperature: float | torch.Tensor, samp: torch.Tensor) -> float | torch.Tensor:
    """A temperature field (1, X, Y, Z) interpolated at a slab's sample points; a number as it is."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    field = temperature.float().cpu()[None]
    return F.grid_sample(field, samp, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _share(progress: Callable[[float], None] | None, lo: float, hi: float) -> Callable[[float], None] | None:
    """Progress of one pass mapped onto [lo, hi] of the back-projection."""
    return None if progress is None else (lambda f: progress(lo + (hi - lo) * f))


def fit_voxels(
    probs: torch.Tensor, grid: ModelGrid, image: sitk.Image, band: float, n: int, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Interpolated probabilities (C, N) and input intensities (N,) of up to ``n`` random input
    voxels of the box :func:`backproject` samples with an intensity model of this ``band``: what
    :func:`msdseg.inference.intensity.fit_intensity_model` is fitted to.  None if no grid voxel is in it."""
    vol = probs.float().cpu()[None]
    grid_box = _foreground_grid_box(vol[0], band)
    if grid_box is None:
        return None
    mat = torch.from_numpy(input_index_to_grid_index(image, grid)).float()
    start, stop = _input_box(mat, grid_box, image.GetSize())
    ijk = draw_fit_voxels(start, stop, n, np.random.default_rng(seed))
    p, _, inside = _interpolate(vol, torch.from_numpy(ijk).float()[:, None, None, :], mat,
                                torch.tensor(grid.shape, dtype=torch.float32))
    keep = inside.reshape(-1)
    values = sitk.GetArrayViewFromImage(image)[ijk[:, 2], ijk[:, 1], ijk[:, 0]].astype(np.float32)
    return p[0].reshape(p.shape[1], -1)[:, keep], torch.from_numpy(values)[keep]


def intensity_model_for(
    probs: torch.Tensor, grid: ModelGrid, image: sitk.Image, plan: Preset, seed: int,
    source_spacing: tuple[float, ...] | None = None,
) -> IntensityModel | None:
    """The scan's fitted intensity model when the plan asks for it and the scan is fine enough
    to add detail to ``grid`` (:mod:`msdseg.inference.intensity`); None otherwise.  ``source_spacing``:
    the scan's own spacing when ``image`` is the scan on a finer output grid (interpolation adds no
    detail, so the decision follows what was acquired)."""
    spacing = image.GetSpacing() if source_spacing is None else source_spacing
    if not plan.intensity or not worth_refining(spacing, grid.spacing_mm):
        return None
    voxels = fit_voxels(probs, grid, image, BAND, FIT_VOXELS, seed)
    return None if voxels is None else fit_intensity_model(*voxels)


def _interpolate(
    vol: torch.Tensor, idx: torch.Tensor, mat: torch.Tensor, shape: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trilinear probabilities (1, C, *idx.shape[:3]) of ``vol`` (1, C, X, Y, Z) at input indices
    ``idx`` (..., 3), with the grid_sample coordinates used and which points lie inside the grid."""
    g = idx @ mat[:3, :3].T + mat[:3, 3]
    norm = g / (shape - 1) * 2 - 1  # model (x, y, z) -> [-1, 1]
    samp = norm.flip(-1)[None]  # grid_sample wants (z, y, x) order for a (X, Y, Z) volume
    p = F.grid_sample(vol, samp, mode="bilinear", padding_mode="zeros", align_corners=True)
    return p, samp, ((norm >= -1) & (norm <= 1)).all(-1)


def _as_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like)
    return out


def _foreground_grid_box(
    probs: torch.Tensor, band: float | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Inclusive grid-index box of the voxels whose most likely channel is not background (0), or
    with ``band`` whose background probability is below it, grown by one voxel (a sample point's
    trilinear neighbours lie within one voxel); None if none."""
    fg = probs.argmax(0) != 0 if band is None else probs[0] < band
    if not bool(fg.any()):
        return None
    idx = fg.nonzero()
    lo = (idx.min(0).values - 1).clamp(min=0)
    hi = torch.minimum(idx.max(0).values + 1, torch.tensor(fg.shape) - 1)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def _input_box(
    mat: torch.Tensor, grid_box: tuple[tuple[int, ...], tuple[int, ...]], size: tuple[int, ...]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Half-open input-index box (i, j, k) that holds every input voxel whose centre maps into the
    inclusive grid-index box: its eight corners mapped back through the inverse of ``mat``, one
    voxel of slack for rounding, clipped to the image."""
    lo, hi = grid_box
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    pts = corners @ np.linalg.inv(mat.double().numpy()).T
    start = np.clip(np.floor(pts[:, :3].min(0)) - 1, 0, np.array(size)).astype(int)
    stop = np.clip(np.ceil(pts[:, :3].max(0)) + 2, 0, np.array(size)).astype(int)
    return (int(start[0]), int(start[1]), int(start[2])), (int(stop[0]), int(stop[1]), int(stop[2]))

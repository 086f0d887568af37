"""The best Dice a model working at a coarser grid could reach: the reference itself sent through it.

Why: the presets label a 1 mm scan on a 2 mm (balanced) or 4 mm (fast) grid and interpolate the
class probabilities back to the scan.  Even a perfect model would lose thin structures on the way.
Here the reference one-hot map is average-pooled to the coarse grid (the exact partial-volume
fractions a perfect soft answer would hold), interpolated back trilinearly as
:mod:`msdseg.inference.backproject` does, and scored against itself.  If a structure's ceiling is high and the
model's score low, the model, not the grid, is what limits it.

A thick-slice scan answered on its own grid has a harder limit: one label per thick voxel.
:func:`majority_on_grid` puts a 1 mm label map on such a grid the way the best hard answer would
(each voxel takes the label covering most of its footprint); scored against the 1 mm map after
nearest upsampling, that is what the grid alone costs (:mod:`msdseg.evaluation.robustness`).

Usage: ``python -m msdseg.evaluation.diagnostics.resolution_ceiling LABELS.nii.gz [--spacing 2 4]`` (1 mm label maps).
"""
from __future__ import annotations

import argparse
import math

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from msdseg.core.errors import InputError
from msdseg.core.labels import LabelTree, load_tree
from msdseg.evaluation.metrics import same_grid


def ceiling_dice(channels: np.ndarray, n_classes: int, factor: int) -> dict[int, float]:
    """Dice per channel (present in ``channels``, background excluded) after pooling by ``factor``
    and trilinear interpolation back, argmax."""
    ch = torch.from_numpy(channels.astype(np.int64))
    shape = ch.shape
    onehot = F.one_hot(ch, n_classes).permute(3, 0, 1, 2).float()[None]
    pad = [p for n in reversed(shape) for p in (0, (-n) % factor)]
    coarse = F.avg_pool3d(F.pad(onehot, pad), factor)
    back = F.interpolate(coarse, scale_factor=factor, mode="trilinear", align_corners=False)
    pred = back[0, :, : shape[0], : shape[1], : shape[2]].argmax(0)
    out = {}
    for c in range(1, n_classes):
        ref = ch == c
        n_ref = int(ref.sum())
        if n_ref:
            hit = pred == c
            out[c] = 2.0 * float((hit & ref).sum()) / (float(hit.sum()) + n_ref)
    return out


#: label number of "not labelled" voxels in the prepared maps: they do not vote
IGNORE_LABEL = 255


def footprint_factors(grid: sitk.Image, labels: sitk.Image) -> tuple[int, int, int]:
    """Sub-points per axis of ``grid`` that sample one of its voxels at about ``labels``' spacing."""
    fine = min(labels.GetSpacing())
    return tuple(max(1, int(np.ceil(s / fine - 1e-6))) for s in grid.GetSpacing())  # type: ignore[return-value]


def majority_on_grid(labels: sitk.Image, grid: sitk.Image, ignore: int | None = IGNORE_LABEL) -> sitk.Image:
    """``labels`` on ``grid``: each voxel takes the label that covers most of its footprint.

    Why: the best single label of a thick voxel is the argmax of the averaged one-hot map over
    its extent, not the label at its centre.  Each voxel is sampled at sub-points on a regular
    lattice over its box (:func:`footprint_factors` per axis: on a grid nested in ``labels``'
    grid they are exactly the fine voxels it contains), each sub-point takes its nearest ``labels``
    voxel and votes.  ``ignore`` voxels and sub-points outside ``labels`` do not vote; a voxel
    without votes gets ``ignore`` (0 when None).  Ties go to the lower label number.  ``labels``
    itself (same values) when the grids are the same."""
    if same_grid(labels, grid):
        return labels
    arr = sitk.GetArrayViewFromImage(labels)  # (k, j, i)
    values = np.unique(arr)
    values = values[values != ignore] if ignore is not None else values
    compact = np.zeros(int(arr.max()) + 1, np.int64)
    compact[values] = np.arange(len(values))
    size = grid.GetSize()
    n_vox = int(np.prod(size))
    counts = np.zeros((max(len(values), 1), n_vox), np.uint16)
    voxel = np.arange(n_vox)
    to_labels = _index_map(grid, labels)
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size[::-1]], indexing="ij")
    factors = footprint_factors(grid, labels)
    offsets = [((np.arange(n) + 0.5) / n - 0.5) for n in factors]
    for oi in offsets[0]:
        for oj in offsets[1]:
            for ok in offsets[2]:
                idx = np.stack([ii.ravel() + oi, jj.ravel() + oj, kk.ravel() + ok, np.ones(n_vox)])
                src = np.rint(to_labels @ idx)[:3].astype(np.int64)  # (i, j, k) in labels
                inside = np.all((src >= 0) & (src < np.asarray(labels.GetSize())[:, None]), axis=0)
                lab = np.full(n_vox, -1 if ignore is None else ignore, np.int64)
                lab[inside] = arr[src[2, inside], src[1, inside], src[0, inside]]
                vote = inside & (lab != ignore) if ignore is not None else inside
                counts[compact[lab[vote]], voxel[vote]] += 1
    out = values[counts.argmax(0)] if len(values) else np.zeros(n_vox, arr.dtype)
    out = np.where(counts.sum(0) > 0, out, 0 if ignore is None else ignore).astype(arr.dtype)
    image = sitk.GetImageFromArray(out.reshape(size[::-1]))
    image.CopyInformation(grid)
    return image


def _index_map(src: sitk.Image, dst: sitk.Image) -> np.ndarray:
    """4x4 matrix taking ``src`` voxel indices (i, j, k) to continuous ``dst`` voxel indices."""
    def index_to_physical(image: sitk.Image) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        m[:3, 3] = image.GetOrigin()
        return m
    return np.linalg.inv(index_to_physical(dst)) @ index_to_physical(src)


def ceiling_for_file(path: str, spacings: list[float], tree: LabelTree | None = None) -> dict[float, dict[str, float]]:
    """Leaf Dice ceilings of an aseg-numbered 1 mm label map at each coarse spacing."""
    tree = tree or load_tree()
    img = nib.load(path)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if any(abs(z - 1.0) > 1e-3 for z in zooms):
        raise InputError(f"{path}: needs 1 mm voxels, has {zooms}")
    labels = np.asarray(img.dataobj).astype(np.int64)
    channels = tree.aseg_lookup(int(labels.max()))[labels]
    names = ["background"] + [leaf.id for leaf in tree.leaves]
    out = {}
    for s in spacings:
        factor = int(round(s))
        if factor < 1 or abs(factor - s) > 1e-6:
            raise InputError(f"--spacing {s}: whole millimetres only")
        out[s] = {names[c]: d for c, d in ceiling_dice(channels, tree.n_classes, factor).items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.diagnostics.resolution_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("labels", help="1 mm label map in aseg numbers (e.g. DATA/fsaverage/fsaverage_labels.nii.gz)")
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0, 4.0])
    args = p.parse_args(argv)
    try:
        result = ceiling_for_file(args.labels, args.spacing)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    for s, dice in result.items():
        mean = sum(dice.values()) / len(dice) if dice else math.nan
        low = ", ".join(f"{k} {v:.2f}" for k, v in sorted(dice.items(), key=lambda kv: kv[1]) if v < 0.9)
        print(f"{s:g} mm: mean leaf Dice ceiling {mean:.3f}; under 0.90: {low or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

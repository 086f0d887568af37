"""The best Dice a model working at a coarser grid could reach: the reference itself sent through it.

Why: the presets label a 1 mm scan on a 2 mm (balanced) or 4 mm (fast) grid and interpolate the
class probabilities back to the scan.  Even a perfect model would lose thin structures on the way.
Here the reference one-hot map is average-pooled to the coarse grid (the exact partial-volume
fractions a perfect soft answer would hold), interpolated back trilinearly as
:mod:`msdseg.inference.backproject` does, and scored against itself.  If a structure's ceiling is high and the
model's score low, the model, not the grid, is what limits it.

Usage: ``python -m msdseg.evaluation.diagnostics.resolution_ceiling LABELS.nii.gz [--spacing 2 4]`` (1 mm label maps).
"""
from __future__ import annotations

import argparse
import math

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from msdseg.core.errors import InputError
from msdseg.core.labels import LabelTree, load_tree


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

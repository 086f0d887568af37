"""Does the model hold up on the same anatomy stored the ways real scans are stored?

The held-out T1 is turned into variants that a user may load — other axis order and direction
(LPS-like), an oblique acquisition, 12-bit integers, floats on an arbitrary scale, thick slices, a
smooth intensity shading (bias field) —
and each is segmented with the default settings and scored against the untouched reference.  A
robust pipeline gives about the same Dice for all of them; a drop points at the step (reorientation,
intensity normalisation, resolution handling) that breaks.

Usage: ``python -m msdseg.evaluation.robustness --data DATA/manifest.json [--model M] -o OUT``; writes
``robustness.json``, ``robustness.csv`` and ``robustness.png``.

With ``--variants resolution`` each coarse variant is also scored on its own grid, where a thick
answer can be judged fairly (:class:`GridScores`): against the reference put on that grid by
majority vote, next to the 1 mm scan's answer put there the same way, and with the grid's ceiling;
one JSON per variant in ``variants/``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from msdseg.core.settings import add_intensity_argument


def _rotation_about_centre(image: sitk.Image, degrees: tuple[float, float, float]) -> sitk.Image:
    """Resample ``image`` onto a grid whose axes are rotated by ``degrees`` (x, y, z) about its
    centre, large enough to hold the whole rotated volume: an oblique acquisition of the same head."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    rot = sitk.Euler3DTransform(centre, *np.deg2rad(degrees).tolist())
    direction = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    extent = np.asarray(image.GetSize()) * spacing
    size = np.ceil(np.abs(np.asarray(rot.GetMatrix()).reshape(3, 3)) @ extent / spacing).astype(int)
    origin = np.asarray(centre) - direction @ ((size - 1) / 2.0 * spacing)
    ref = sitk.Image([int(s) for s in size], image.GetPixelID())
    ref.SetSpacing(tuple(spacing))
    ref.SetDirection(tuple(direction.ravel()))
    ref.SetOrigin(tuple(origin))
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0)


def _thick_slices(image: sitk.Image, axis: int, thickness_mm: float) -> sitk.Image:
    """Blur along ``axis`` like a slice profile of ``thickness_mm`` (FWHM) and keep one slice per
    ``thickness_mm``: an anisotropic 2-D acquisition."""
    from scipy.ndimage import gaussian_filter1d

    spacing = list(image.GetSpacing())
    arr = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x): ITK axis a is array axis 2 - a
    blurred = sitk.GetImageFromArray(gaussian_filter1d(arr, thickness_mm / 2.355 / spacing[axis], axis=2 - axis))
    blurred.CopyInformation(image)
    blurred = sitk.Cast(blurred, image.GetPixelID())
    size = list(image.GetSize())
    size[axis] = max(1, int(round(size[axis] * spacing[axis] / thickness_mm)))
    first = [0.0, 0.0, 0.0]
    first[axis] = (thickness_mm / spacing[axis] - 1) / 2.0  # the first thick slice's centre, in old index units
    new_spacing = list(spacing)
    new_spacing[axis] = thickness_mm
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(new_spacing)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(first))
    return sitk.Resample(blurred, ref, sitk.Transform(), sitk.sitkLinear, 0.0)


def _rescaled(image: sitk.Image, lo: float, hi: float, dtype: type) -> sitk.Image:
    """The same image with intensities mapped linearly onto [lo, hi] and stored as ``dtype``."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    a0, a1 = float(arr.min()), float(arr.max())
    arr = lo + (arr - a0) / max(a1 - a0, 1e-12) * (hi - lo)
    if np.issubdtype(dtype, np.integer):
        arr = np.round(arr)
    out = sitk.GetImageFromArray(arr.astype(dtype))
    out.CopyInformation(image)
    return out


def _bias_field(image: sitk.Image, strength: float) -> sitk.Image:
    """The same image times a smooth field ``exp(strength * f)``, ``f`` a fixed mix of linear and
    cross terms of the normalised voxel position (about 0.67-2.2 at strength 0.4): the receive-coil
    shading of a scan that was not bias-corrected."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    k, j, i = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in arr.shape], indexing="ij")
    out = sitk.GetImageFromArray(arr * np.exp(strength * (0.6 * i + 0.5 * k - 0.4 * j + 0.5 * i * k)))
    out.CopyInformation(image)
    return out


VARIANTS: dict[str, Callable[[sitk.Image], sitk.Image]] = {
    "as stored": lambda im: im,
    "axes permuted and flipped": lambda im: sitk.Flip(sitk.PermuteAxes(im, [2, 0, 1]), [True, False, True]),
    "oblique (15 deg, 10 deg)": lambda im: _rotation_about_centre(im, (15.0, 0.0, 10.0)),
    "12-bit integers": lambda im: _rescaled(im, 0.0, 4095.0, np.int16),
    "float, scale 1e-3": lambda im: _rescaled(im, 0.0, 1e-3, np.float32),
    "5 mm thick slices": lambda im: _thick_slices(im, 2, 5.0),
    "bias field (x0.67-2.2)": lambda im: _bias_field(im, 0.4),
}

_AXIS_NAMES = ("x", "y", "z")


def _isotropic(image: sitk.Image, mm: float) -> sitk.Image:
    for axis in range(3):
        image = _thick_slices(image, axis, mm)
    return image


#: The resolutions clinical scans come at: 3 and 5 mm slices along each voxel axis in turn (the
#: held-out T1's axes, whatever anatomical direction they have), and 3 mm isotropic.
RESOLUTION_VARIANTS: dict[str, Callable[[sitk.Image], sitk.Image]] = {
    "1 mm (as stored)": lambda im: im,
    **{f"{mm:g} mm slices along {_AXIS_NAMES[axis]}": (lambda im, a=axis, m=mm: _thick_slices(im, a, m))
       for mm in (3.0, 5.0) for axis in range(3)},
    "3 mm isotropic": lambda im: _isotropic(im, 3.0),
}
VARIANT_SETS = {"storage": VARIANTS, "resolution": RESOLUTION_VARIANTS}


def run(
    image: sitk.Image, reference: sitk.Image, segment: Callable[[sitk.Image], sitk.Image],
    score: Callable[[sitk.Image, sitk.Image], dict[str, Any]], variants: dict[str, Callable] | None = None,
) -> list[dict[str, Any]]:
    """Write every variant of ``image`` as NIfTI, read it back like ``msdseg segment`` does,
    segment it and score it (``score(labels, variant as loaded)``); one row each, in order."""
    import tempfile

    from msdseg.core.io import load_volume

    rows = []
    for name, make in (variants or VARIANTS).items():
        variant = make(image)
        with tempfile.TemporaryDirectory() as tmp:  # through a file, as a user's scan arrives
            path = Path(tmp) / "variant.nii.gz"
            sitk.WriteImage(variant, str(path))
            loaded = load_volume(path)
        t0 = time.time()
        labels = segment(loaded)
        seconds = time.time() - t0
        row = {"variant": name, "size": list(variant.GetSize()),
               "spacing_mm": [round(s, 3) for s in variant.GetSpacing()],
               "pixel_type": variant.GetPixelIDTypeAsString(), "seconds": round(seconds, 1)}
        row.update(score(labels, loaded))
        rows.append(row)
    return rows


def leaf_dice(labels: sitk.Image, reference: sitk.Image, tree: Any = None,
              only_labels: list[int] | None = None) -> dict[str, float]:
    """Dice of every leaf the reference or the answer holds, as ``evaluate`` counts it (numbers the
    tree lacks are background; nearest neighbour onto the reference's grid when the grids differ)
    without its distances, which cost minutes per call at 1 mm.  ``only_labels``: a partial
    reference's leaves (aseg numbers), the only ones scored; each leaf's Dice compares that leaf's
    two masks, so labels the reference does not define cost nothing."""
    from msdseg.core.labels import load_tree
    from msdseg.evaluation.metrics import _resample, same_grid, to_tree_labels

    tree = tree or load_tree()
    if not same_grid(labels, reference):
        labels = _resample(labels, reference, nearest=True)
    pred = to_tree_labels(sitk.GetArrayViewFromImage(labels), tree, name="prediction").ravel()
    ref = to_tree_labels(sitk.GetArrayViewFromImage(reference), tree, name="reference").ravel()
    n = int(tree.channel_to_aseg.max()) + 1
    p_count, r_count = np.bincount(pred, minlength=n), np.bincount(ref, minlength=n)
    both = np.bincount(pred[pred == ref], minlength=n)
    out = {}
    for leaf in tree.leaves:
        lab = int(leaf.label)  # type: ignore[arg-type]
        if (only_labels is None or lab in only_labels) and p_count[lab] + r_count[lab]:
            out[leaf.id] = 2.0 * float(both[lab]) / float(p_count[lab] + r_count[lab])
    return out


def _mean(dice: dict[str, float]) -> float:
    return float(np.mean(list(dice.values()))) if dice else math.nan


class GridScores:
    """Scores of coarse answers on their own grid, where what a thick voxel cannot hold is not
    counted against the answer.

    Why: scored against the 1 mm reference after nearest upsampling, a 5 mm answer loses both what
    the thick scan hid and what no 5 mm voxel can represent.  Here the reference is put on the
    answer's grid by majority vote (:func:`majority_on_grid`) and the answer is scored there
    (``grid_dice``); the 1 mm scan's answer, put on the same grid the same way, is scored against
    the same reference (``one_mm_on_grid_dice``): their gap is what the thick input cost.  The
    ceiling (``grid_ceiling_dice``: the voted reference upsampled to 1 mm against the 1 mm
    reference) is what the grid alone costs.  Per-leaf figures go to ``per_leaf``; ``only_labels``:
    a partial reference's leaves."""

    def __init__(self, reference: sitk.Image, tree: Any, only_labels: list[int] | None = None) -> None:
        self.reference = reference
        self.tree = tree
        self.only_labels = only_labels
        self.one_mm_answer: sitk.Image | None = None

    def __call__(self, labels: sitk.Image, variant: sitk.Image) -> dict[str, Any]:
        from msdseg.evaluation.diagnostics.resolution_ceiling import majority_on_grid
        from msdseg.evaluation.metrics import same_grid

        if same_grid(variant, self.reference) and self.one_mm_answer is None:
            self.one_mm_answer = majority_on_grid(labels, variant)  # the 1 mm scan's answer, on its grid
        ref_on_grid = majority_on_grid(self.reference, variant)
        only = self.only_labels
        per_leaf = {"grid": leaf_dice(majority_on_grid(labels, variant), ref_on_grid, self.tree, only),
                    "grid_ceiling": leaf_dice(ref_on_grid, self.reference, self.tree, only)}
        if self.one_mm_answer is not None:
            per_leaf["one_mm_on_grid"] = leaf_dice(majority_on_grid(self.one_mm_answer, variant), ref_on_grid,
                                                   self.tree, only)
        row: dict[str, Any] = {f"{k}_dice": _mean(v) for k, v in per_leaf.items()}
        if "one_mm_on_grid" in per_leaf:
            row["thick_input_cost"] = row["one_mm_on_grid_dice"] - row["grid_dice"]
        row["per_leaf"] = per_leaf
        return row


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["dice_mean_leaves"] for r in rows], color="#4a7fb5")
    for i, r in enumerate(rows):
        ax.text(r["dice_mean_leaves"] + 0.01, i, f"{r['dice_mean_leaves']:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean Dice over the {rows[0].get('n_leaves', 32)} scored leaves")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="manifest.json of prepare-data (its held-out cases)")
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--variants", choices=sorted(VARIANT_SETS), default="storage",
                   help="storage: axis order, obliquity, integer/float storage, bias, 5 mm slices; "
                        "resolution: 3 and 5 mm slices along each axis and 3 mm isotropic, also scored "
                        "on each variant's own grid (variants/*.json)")
    p.add_argument("--output-spacing", dest="output_mm", type=float, default=None, metavar="MM",
                   help="answer on a grid of at most MM (as msdseg segment --output-spacing)")
    p.add_argument("--case", dest="cases", action="append", default=None, metavar="NAME",
                   help="only this held-out case (repeatable; default: all)")
    add_intensity_argument(p)
    args = p.parse_args(argv)

    from msdseg.evaluation.metrics import _json_safe, evaluate
    from msdseg.evaluation.heldout import heldout_cases, scored_labels
    from msdseg.core.settings import SegmentSettings
    from msdseg.inference.pipeline import segment_image
    from msdseg.core.io import load_volume, read_image
    from msdseg.core.labels import load_tree

    tree = load_tree()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = SegmentSettings(preset=args.preset, model=args.model, check_brain=False, intensity=args.intensity,
                               output_mm=args.output_mm)

    grid_scores: GridScores | None = None  # per case, for the resolution variants
    only_labels: list[int] | None = None

    def score(labels: sitk.Image, variant: sitk.Image) -> dict[str, Any]:
        rep = evaluate(labels, reference, tree, only_labels=only_labels)
        dice = [r.dice for r in rep.structures if r.is_leaf and math.isfinite(r.dice)]
        row = {"n_leaves": len(dice), "dice_mean_leaves": float(np.mean(dice)) if dice else math.nan,
               "dice_min_leaves": float(np.min(dice)) if dice else math.nan,
               "n_swapped_pairs": rep.summary.get("n_swapped_pairs")}
        if grid_scores is not None:
            row.update(grid_scores(labels, variant))
        return row

    results = []
    cases = heldout_cases(Path(args.data))
    unknown = set(args.cases or []) - {c["name"] for c in cases}
    if unknown:
        p.error(f"--case {sorted(unknown)[0]}: not a held-out case of {args.data}")
    for case in cases:
        if args.cases and case["name"] not in args.cases:
            continue
        image = load_volume(case["t1_path"])
        reference = read_image(case["labels_path"])
        only_labels = scored_labels(case)  # a partial reference's leaves, else None (all)
        grid_scores = GridScores(reference, tree, only_labels) if args.variants == "resolution" else None
        rows = run(image, reference, lambda im: segment_image(im, settings).labels, score, VARIANT_SETS[args.variants])
        for r in rows:
            r["case"] = case["name"]
            r["reference"] = case.get("reference", "complete")
            print(f"{case['name']:12s} {r['variant']:28s} mean Dice {r['dice_mean_leaves']:.3f} ({r['n_leaves']} leaves)  "
                  f"min {r['dice_min_leaves']:.3f}  swaps {r['n_swapped_pairs']}  {r['seconds']:.0f} s"
                  + ("" if grid_scores is None else _grid_line(r)), flush=True)
            if "per_leaf" in r:
                _write_variant(out / "variants", r, args)
        plot(rows, out / f"robustness_{args.variants}_{case['name']}.png",
             f"{args.model or 'shipped model'} - {case['name']} - preset {args.preset}")
        results.extend(rows)
    flat = [{k: v for k, v in r.items() if k != "per_leaf"} for r in results]
    (out / "robustness.json").write_text(json.dumps(_json_safe({"model": args.model or "shipped", "preset": args.preset,
                                                                "output_mm": args.output_mm, "rows": flat}), indent=1))
    with open(out / "robustness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        w.writeheader()
        w.writerows(flat)
    return 0


def _grid_line(row: dict[str, Any]) -> str:
    one_mm = row.get("one_mm_on_grid_dice", math.nan)
    return (f"  | own grid {row['grid_dice']:.3f}, 1 mm scan there {one_mm:.3f}, "
            f"ceiling {row['grid_ceiling_dice']:.3f}")


def _write_variant(folder: Path, row: dict[str, Any], args: argparse.Namespace) -> None:
    """One JSON per variant: every column, per-leaf Dice of each comparison, and how it was made."""
    from msdseg.evaluation.metrics import _json_safe

    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in f"{row['case']}_{row['variant']}").strip("_")
    doc = {"model": args.model or "shipped", "preset": args.preset, "output_mm": args.output_mm,
           "intensity": args.intensity, **row}
    (folder / f"{slug}.json").write_text(json.dumps(_json_safe(doc), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())

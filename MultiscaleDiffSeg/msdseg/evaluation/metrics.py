"""Compare a predicted aseg label map with a reference, per leaf and per hierarchy node.

Choices and why:

* **Metrics come from MONAI** (``compute_dice``, ``compute_hausdorff_distance`` with
  ``percentile=95`` and the voxel spacing, i.e. HD95 in mm) so numbers match what the wider community
  computes.  Each structure is cropped to the bounding box of prediction and reference (plus a margin)
  first: the metrics are unchanged and a large case is scored far faster than on its whole grid.
* **Hierarchy nodes** are the union of their leaves in both maps, so errors between siblings (e.g.
  caudate vs putamen) do not count against their parent (subcortical grey matter).
* **Undefined is not zero.**  A structure absent from the reference (or not labelled by a foreign
  reference scheme given through ``ref_label_map``) gets NaN for Dice, HD95 and volume difference
  and is left out of means.  A structure present in the reference but missing from the prediction gets
  Dice 0 and HD95 NaN (no surface to measure) and is flagged ``pred_empty`` and counted in the summary.
* **Grids:** the prediction is resampled onto the reference grid with nearest neighbour when the grids
  differ (uncertainty and probabilities linearly); the report says so in ``notes``.
* **Left/right swaps:** for every lateralised pair (L, R) the prediction is swapped when the crossed
  Dice ``D(pred L, ref R) + D(pred R, ref L)`` exceeds the straight ``D(pred L, ref L) + D(pred R, ref R)``.
  Leaf pairs are counted; hemisphere-level pairs are listed too.
* **Partial references** (a foreign scheme through ``ref_label_map``, or ``only_labels``: the aseg
  numbers a reference such as an atlas of a few structures defines): only the leaves the scheme
  defines are scored, and the mean is over them.  The reference's other voxels mean "none of
  these", not background: a predicted label the scheme lacks (cortex, white matter, ...) costs
  nothing, since each defined leaf's Dice compares only that leaf's two masks.
* **Calibration:** confidence is ``1 - uncertainty`` (or the maximum class probability), error is
  "predicted label != reference label".  Both are evaluated only inside a *brain mask*: the union of
  reference and prediction foreground dilated by ``mask_dilation_mm`` (3 mm).  Without the mask the
  millions of trivially correct background voxels far from the head (confidence ~1, error 0) dominate
  every bin and make any model look calibrated.  For a partial reference, predicted labels the
  scheme lacks are first collapsed into "none of these" (0), so the mask is the union of the
  *defined structures* in either map dilated by 3 mm, and a voxel is wrong when the collapsed
  prediction differs from the reference (false positives and negatives of the defined structures,
  and confusions between them); voxels farther out, where the reference says nothing, are never
  judged.  The confidence there is that of our own label, a lower bound of the confidence in
  "none of these" when our label is one the scheme lacks.
  ECE uses ``n_bins`` (15) equal-width bins.  Spearman
  correlations are reported voxel-wise (uncertainty vs error, on a fixed random subsample of at most
  one million masked voxels) and per structure (mean uncertainty over pred ∪ ref of a leaf vs its Dice).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from msdseg.core.atomic import OutputGroup
from msdseg.core.errors import InputError
from msdseg.core.labels import LabelTree, load_tree
from msdseg.core.volumes import aggregate_volumes, laterality_name, voxel_volume_ml

CROP_MARGIN = 2
MAX_SPEARMAN_VOXELS = 1_000_000

STRUCTURE_COLUMNS = (
    "node_id", "name", "level", "is_leaf", "aseg_label", "laterality", "defined_in_ref",
    "ref_voxels", "pred_voxels", "ref_ml", "pred_ml", "dice", "hd95_mm", "volume_diff_ml",
    "volume_diff_pct", "pred_empty", "mean_uncertainty",
)


@dataclass
class StructureMetrics:
    """Metrics of one tree node (leaf or internal)."""

    node_id: str
    name: str
    level: int
    is_leaf: bool
    aseg_label: int | None
    laterality: str
    defined_in_ref: bool
    ref_voxels: int
    pred_voxels: int
    ref_ml: float
    pred_ml: float
    dice: float = math.nan
    hd95_mm: float = math.nan
    volume_diff_ml: float = math.nan
    volume_diff_pct: float = math.nan
    pred_empty: bool = False
    mean_uncertainty: float = math.nan


@dataclass
class EvaluationReport:
    """Everything :func:`write_report` writes; ``pred``/``ref`` (on the reference grid) are for plots."""

    structures: list[StructureMetrics]
    summary: dict[str, Any]
    swaps: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    notes: list[str]
    pred: sitk.Image | None = field(default=None, repr=False)
    ref: sitk.Image | None = field(default=None, repr=False)

    def by_id(self, node_id: str) -> StructureMetrics:
        return next(s for s in self.structures if s.node_id == node_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN and infinities become null)."""
        return _json_safe({
            "summary": self.summary,
            "swaps": self.swaps,
            "calibration": self.calibration,
            "notes": self.notes,
            "structures": [asdict(s) for s in self.structures],
        })


# ----------------------------------------------------------------------------- inputs
def _as_image(x: sitk.Image | str | os.PathLike) -> sitk.Image:
    if isinstance(x, sitk.Image):
        return x
    from msdseg.core.io import read_image, squeeze_to_3d

    return squeeze_to_3d(read_image(x, validate=False))


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Same size, spacing, origin and direction (within ``tol``: headers round-trip through float32)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)
    )


def read_label_pair(pred: str | os.PathLike, ref: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted and reference label maps (RAS voxel order, int64) and the RAS affine of their one
    grid, for diagnostics that compare voxel by voxel; an ``InputError`` if the grids differ."""
    from msdseg.core.geometry import to_ras_array
    from msdseg.core.io import ras_affine

    pred_img, ref_img = _as_image(pred), _as_image(ref)
    if not same_grid(pred_img, ref_img):
        raise InputError("prediction and reference must share one grid (segment the reference's T1)")
    pred_arr, ref_arr = (to_ras_array(img).astype(np.int64) for img in (pred_img, ref_img))
    return pred_arr, ref_arr, ras_affine(ref_img)


def _resample(image: sitk.Image, reference: sitk.Image, nearest: bool) -> sitk.Image:
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, image.GetPixelID())


#: Largest label number of FreeSurfer's colour table (FreeSurferColorLUT.txt): a reference number
#: above it, or below 0, is not a label of any FreeSurfer-style map but corrupt or foreign data.
MAX_FREESURFER_LABEL = 14175


def to_tree_labels(arr: np.ndarray, tree: LabelTree, label_map: Mapping[int, int] | None = None,
                   name: str = "labels") -> np.ndarray:
    """Aseg numbers of the tree (int32); FreeSurfer numbers the tree lacks (vessels, choroid plexus,
    white-matter hypointensities) -> 0.  ``label_map`` maps foreign -> aseg first.

    Numbers outside FreeSurfer's label range are an :class:`InputError`, not background: they mean
    the file is not a label map of this kind.  Within that range a lookup table (at most
    ``MAX_FREESURFER_LABEL + 1`` entries) maps the voxels; outside it (a foreign numbering given in
    ``label_map``) the distinct values present are mapped, so memory never depends on how large a
    number is.
    """
    arr = np.asarray(arr)
    if not arr.size:
        return np.zeros(arr.shape, np.int32)
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise InputError(f"{name}: label values must be whole numbers (found fractions)")
    lo, hi = int(arr.min()), int(arr.max())
    if 0 <= lo and hi <= MAX_FREESURFER_LABEL:
        values, index = np.arange(hi + 1), arr.astype(np.int64, copy=False)
    else:
        values, index = np.unique(arr, return_inverse=True)
        values = values.astype(np.int64)
    mapped_keys = set() if label_map is None else {int(k) for k in label_map}
    bad = [int(v) for v in values if (v < 0 or v > MAX_FREESURFER_LABEL) and int(v) not in mapped_keys]
    if bad:
        raise InputError(f"{name}: label {bad[0]} is outside FreeSurfer's label numbers (0-{MAX_FREESURFER_LABEL})"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; give --ref-labels for another numbering")
    if label_map is None:
        label_map = {int(a): int(a) for a in tree.channel_to_aseg[1:]}
    known = {int(a) for a in tree.channel_to_aseg[1:]}
    table = np.array([int(label_map[int(v)]) if int(v) in label_map and int(label_map[int(v)]) in known else 0
                      for v in values], dtype=np.int32)
    return table[index].reshape(arr.shape)


def defined_leaves(tree: LabelTree, label_map: Mapping[int, int] | None) -> set[str]:
    """Leaves the reference *scheme* labels: all of them for aseg numbering, else the map's targets."""
    if label_map is None:
        return {leaf.id for leaf in tree.leaves}
    targets = {int(v) for v in label_map.values()}
    return {leaf.id for leaf in tree.leaves if int(leaf.label) in targets}  # type: ignore[arg-type]


def partial_label_map(tree: LabelTree, only_labels: Collection[int],
                      ref_label_map: Mapping[int, int] | None = None) -> dict[int, int]:
    """Reference map that keeps only the leaves ``only_labels`` (aseg numbers); any other number -> 0.

    Composed with ``ref_label_map`` when the reference has a foreign numbering.  Numbers that are
    not leaves of the tree are an :class:`InputError` (a typo must not silently score nothing).
    """
    leaves = {int(leaf.label) for leaf in tree.leaves}  # type: ignore[arg-type]
    wanted = {int(v) for v in only_labels}
    bad = sorted(wanted - leaves)
    if bad or not wanted:
        raise InputError(f"only-labels: {bad or 'none given'} are not leaf aseg numbers of the label tree")
    if ref_label_map is None:
        return {v: v for v in sorted(wanted)}
    return {int(k): int(v) for k, v in ref_label_map.items() if int(v) in wanted}


def freesurfer_cortex_map(values: Sequence[int]) -> dict[int, int]:
    """Map for aparc+aseg style references: 1000-1999 -> 3, 2000-2999 -> 42, aseg numbers kept.

    Why: cortical parcels replace labels 3/42 in aparc+aseg files (FreeSurfer, the MNI
    ``desikan_killiany`` atlas); without this they would count as background.
    """
    out: dict[int, int] = {}
    for v in (int(x) for x in values):
        if 1000 <= v < 2000:
            out[v] = 3
        elif 2000 <= v < 3000:
            out[v] = 42
        elif 0 < v < 1000:
            out[v] = v
    return out


# ----------------------------------------------------------------------------- metrics
def _bbox(slices: Sequence[tuple[slice, ...] | None], shape: Sequence[int]) -> tuple[slice, ...] | None:
    """Union of ``find_objects`` boxes, grown by :data:`CROP_MARGIN` (so surfaces stay inside)."""
    boxes = [s for s in slices if s is not None]
    if not boxes:
        return None
    out = []
    for axis, n in enumerate(shape):
        lo = min(b[axis].start for b in boxes) - CROP_MARGIN
        hi = max(b[axis].stop for b in boxes) + CROP_MARGIN
        out.append(slice(max(lo, 0), min(hi, int(n))))
    return tuple(out)


def monai_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks with MONAI (NaN when both are empty)."""
    import torch
    from monai.metrics import compute_dice

    if not pred.any() and not ref.any():
        return math.nan
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32)[None, None])
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)[None, None])
    return float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (NaN if either mask is empty)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not ref.any():
        return math.nan
    p = torch.from_numpy(np.ascontiguousarray(pred)[None, None])
    r = torch.from_numpy(np.ascontiguousarray(ref)[None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI-internal deprecation notice
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95.0,
                                        spacing=[float(s) for s in spacing])
    return float(hd[0, 0])


class _Masks:
    """Cropped boolean masks of tree nodes in two aligned label arrays (aseg numbers)."""

    def __init__(self, pred: np.ndarray, ref: np.ndarray, tree: LabelTree) -> None:
        from scipy.ndimage import find_objects

        self.pred, self.ref, self.tree = pred, ref, tree
        top = int(tree.channel_to_aseg.max())
        self.pred_boxes = find_objects(pred, max_label=top)
        self.ref_boxes = find_objects(ref, max_label=top)

    def labels_of(self, node_id: str) -> list[int]:
        return [int(leaf.label) for leaf in self.tree.descendant_leaves(node_id)]  # type: ignore[arg-type]

    def ref_present(self, node_id: str) -> bool:
        return any(self.ref_boxes[lab - 1] is not None for lab in self.labels_of(node_id))

    def box(self, p_labels: Sequence[int], r_labels: Sequence[int]) -> tuple[slice, ...] | None:
        return _bbox([self.pred_boxes[lab - 1] for lab in p_labels]
                     + [self.ref_boxes[lab - 1] for lab in r_labels], self.pred.shape)

    def cropped(self, pred_ids: Sequence[str], ref_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pred mask of ``pred_ids`` union, ref mask of ``ref_ids`` union) on their common box."""
        p_labels = [lab for n in pred_ids for lab in self.labels_of(n)]
        r_labels = [lab for n in ref_ids for lab in self.labels_of(n)]
        box = self.box(p_labels, r_labels)
        if box is None:
            return np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool)
        return np.isin(self.pred[box], p_labels), np.isin(self.ref[box], r_labels)

    def mean_over(self, values: np.ndarray, label: int) -> float:
        """Mean of ``values`` over the voxels labelled ``label`` in pred or ref (NaN when none)."""
        box = self.box([label], [label])
        if box is None:
            return math.nan
        region = (self.pred[box] == label) | (self.ref[box] == label)
        return float(values[box][region].mean()) if region.any() else math.nan


def _structure_rows(
    masks: _Masks, tree: LabelTree, defined: set[str], spacing_kji: Sequence[float],
    unit_ml: float, uncertainty: np.ndarray | None,
) -> list[StructureMetrics]:
    pred_counts = np.bincount(masks.pred.ravel(), minlength=int(tree.channel_to_aseg.max()) + 1)
    ref_counts = np.bincount(masks.ref.ravel(), minlength=int(tree.channel_to_aseg.max()) + 1)
    leaf_pred = {lf.id: int(pred_counts[int(lf.label)]) for lf in tree.leaves}  # type: ignore[arg-type]
    leaf_ref = {lf.id: int(ref_counts[int(lf.label)]) for lf in tree.leaves}  # type: ignore[arg-type]
    # integer counts summed exactly, mL via msdseg.core.volumes so parents are sums of children
    pred_ml = aggregate_volumes({k: v * unit_ml for k, v in leaf_pred.items()}, tree)
    ref_ml = aggregate_volumes({k: v * unit_ml for k, v in leaf_ref.items()}, tree)
    rows = []
    for node in tree.nodes:
        leaves = tree.descendant_leaves(node.id)
        n_pred = sum(leaf_pred[lf.id] for lf in leaves)
        n_ref = sum(leaf_ref[lf.id] for lf in leaves)
        row = StructureMetrics(
            node_id=node.id, name=node.name, level=tree.depth(node.id), is_leaf=node.is_leaf,
            aseg_label=node.label, laterality=laterality_name(tree, node.id),
            defined_in_ref=node.id in defined, ref_voxels=n_ref, pred_voxels=n_pred,
            ref_ml=ref_ml[node.id], pred_ml=pred_ml[node.id],
        )
        if row.defined_in_ref and n_ref > 0:
            p, r = masks.cropped([node.id], [node.id])
            row.dice = monai_dice(p, r)
            row.hd95_mm = monai_hd95(p, r, spacing_kji)
            row.volume_diff_ml = row.pred_ml - row.ref_ml
            row.volume_diff_pct = 100.0 * row.volume_diff_ml / row.ref_ml
            row.pred_empty = n_pred == 0
        if uncertainty is not None and node.is_leaf:
            row.mean_uncertainty = masks.mean_over(uncertainty, int(node.label))  # type: ignore[arg-type]
        rows.append(row)
    return rows


def lateral_pairs(tree: LabelTree) -> list[tuple[str, str]]:
    """(left id, right id) of every node with a twin, leaves first."""
    pairs = [(n.id, tree.twin(n.id)) for n in tree.nodes if n.id.startswith("left_") and tree.twin(n.id)]
    return sorted(pairs, key=lambda p: not tree[p[0]].is_leaf)  # type: ignore[return-value]


def detect_swaps(masks: _Masks, tree: LabelTree, defined: set[str]) -> list[dict[str, Any]]:
    """Straight vs crossed Dice of every lateralised pair defined and present in the reference."""
    out = []
    for left, right in lateral_pairs(tree):
        if left not in defined or right not in defined:
            continue
        if not (masks.ref_present(left) and masks.ref_present(right)):
            continue
        d_ll = monai_dice(*masks.cropped([left], [left]))
        d_rr = monai_dice(*masks.cropped([right], [right]))
        d_lr = monai_dice(*masks.cropped([left], [right]))
        d_rl = monai_dice(*masks.cropped([right], [left]))
        straight = np.nansum([d_ll, d_rr])
        crossed = np.nansum([d_lr, d_rl])
        out.append({
            "left": left, "right": right, "is_leaf": tree[left].is_leaf,
            "dice_straight": (d_ll, d_rr), "dice_crossed": (d_lr, d_rl),
            "swapped": bool(crossed > straight),
        })
    return out


# ----------------------------------------------------------------------------- calibration
def brain_mask(pred: sitk.Image, ref: sitk.Image, dilation_mm: float) -> np.ndarray:
    """(k, j, i) mask: union of foregrounds dilated by ``dilation_mm`` (anisotropic ball)."""
    fg = sitk.Cast((pred > 0) | (ref > 0), sitk.sitkUInt8)
    radius = [max(0, int(math.ceil(dilation_mm / s))) for s in ref.GetSpacing()]
    if any(radius):
        fg = sitk.BinaryDilate(fg, radius, sitk.sitkBall, 0, 1)
    return sitk.GetArrayFromImage(fg).astype(bool)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """ECE = sum_b n_b/N |accuracy_b - mean confidence_b| over equal-width bins of [0, 1]."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), 0.0, 1.0)
    corr = np.asarray(correct, dtype=bool).ravel()
    if conf.size == 0:
        return {"ece": math.nan, "n_voxels": 0, "n_bins": n_bins, "bins": []}
    index = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(index, weights=corr.astype(np.float64), minlength=n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        n = int(counts[b])
        mean_conf = conf_sum[b] / n if n else math.nan
        acc = corr_sum[b] / n if n else math.nan
        if n:
            ece += n / conf.size * abs(acc - mean_conf)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": n,
                     "mean_confidence": mean_conf, "accuracy": acc})
    return {"ece": float(ece), "n_voxels": int(conf.size), "n_bins": n_bins,
            "accuracy": float(corr.mean()), "mean_confidence": float(conf.mean()), "bins": bins}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # undefined for constant inputs (e.g. a perfect prediction has no errors)
    return float(spearmanr(a, b).statistic)


def _subsample(n: int, limit: int) -> np.ndarray | slice:
    if n <= limit:
        return slice(None)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def calibration_metrics(
    confidence: np.ndarray, uncertainty: np.ndarray, error: np.ndarray, mask: np.ndarray,
    rows: Sequence[StructureMetrics], masks: _Masks, n_bins: int, source: str,
) -> dict[str, Any]:
    """ECE and Spearman correlations inside ``mask`` (see the module docstring for why a mask)."""
    conf, unc, err = confidence[mask], uncertainty[mask], error[mask]
    out = expected_calibration_error(conf, ~err, n_bins)
    pick = _subsample(unc.size, MAX_SPEARMAN_VOXELS)
    out["confidence_source"] = source
    out["spearman_uncertainty_vs_error_voxels"] = _spearman(unc[pick], err[pick])
    pairs = [(masks.mean_over(uncertainty, int(r.aseg_label)), r.dice)  # type: ignore[arg-type]
             for r in rows if r.is_leaf and math.isfinite(r.dice)]
    pairs = [(u, d) for u, d in pairs if math.isfinite(u)]
    out["spearman_mean_uncertainty_vs_dice"] = _spearman([u for u, _ in pairs], [d for _, d in pairs])
    out["n_structures_for_correlation"] = len(pairs)
    return out


def _max_probability(probabilities: np.ndarray | sitk.Image, grid: sitk.Image) -> sitk.Image:
    """Maximum class probability as an image on ``grid`` (numpy input is [C, k, j, i] on that grid)."""
    if isinstance(probabilities, sitk.Image):
        arr = sitk.GetArrayFromImage(probabilities)  # (k, j, i, C) for vector images
        peak = arr.max(axis=-1) if probabilities.GetNumberOfComponentsPerPixel() > 1 else arr
        image = sitk.GetImageFromArray(peak.astype(np.float32))
        image.CopyInformation(probabilities)
        return image
    arr = np.asarray(probabilities)
    if arr.ndim != 4 or arr.shape[1:] != sitk.GetArrayViewFromImage(grid).shape:
        raise ValueError(f"probabilities must be [C, k, j, i] on the prediction grid, got {arr.shape}")
    image = sitk.GetImageFromArray(arr.max(axis=0).astype(np.float32))
    image.CopyInformation(grid)
    return image


# ----------------------------------------------------------------------------- main entry
def _summary(rows: Sequence[StructureMetrics], swaps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean(vals: list[float]) -> float:
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    leaves = [r for r in rows if r.is_leaf]
    internal = [r for r in rows if not r.is_leaf]
    leaf_swaps = [s for s in swaps if s["is_leaf"]]
    return {
        "n_leaves_evaluated": sum(math.isfinite(r.dice) for r in leaves),
        "n_leaves_excluded": sum(not math.isfinite(r.dice) for r in leaves),
        "excluded_leaves": [r.node_id for r in leaves if not math.isfinite(r.dice)],
        "n_leaves_missing_in_pred": sum(r.pred_empty for r in leaves),
        "dice_mean_leaves": mean([r.dice for r in leaves]),
        "dice_median_leaves": float(np.nanmedian([r.dice for r in leaves])) if any(
            math.isfinite(r.dice) for r in leaves) else math.nan,
        "hd95_mean_leaves_mm": mean([r.hd95_mm for r in leaves]),
        "abs_volume_diff_pct_mean_leaves": mean([abs(r.volume_diff_pct) for r in leaves]),
        "dice_mean_internal": mean([r.dice for r in internal]),
        "dice_by_node": {r.node_id: r.dice for r in internal},
        "n_swapped_pairs": sum(s["swapped"] for s in leaf_swaps),
        "n_pairs_checked": len(leaf_swaps),
        "swapped_pairs": [f"{s['left']}/{s['right']}" for s in swaps if s["swapped"]],
    }


def evaluate(
    pred: sitk.Image | str | os.PathLike,
    ref: sitk.Image | str | os.PathLike,
    tree: LabelTree | None = None,
    ref_label_map: Mapping[int, int] | None = None,
    uncertainty: sitk.Image | str | os.PathLike | None = None,
    probabilities: np.ndarray | sitk.Image | None = None,
    *,
    n_bins: int = 15,
    mask_dilation_mm: float = 3.0,
    only_labels: Collection[int] | None = None,
) -> EvaluationReport:
    """Per-structure and per-node metrics, L/R swap check and (optionally) calibration.

    ``pred`` holds aseg numbers; ``ref`` aseg numbers or a foreign numbering mapped by
    ``ref_label_map`` (foreign number -> aseg number; unmapped numbers count as background).
    ``only_labels``: the leaf aseg numbers a partial reference defines (after ``ref_label_map``);
    only they are scored (see the module docstring).  ``uncertainty`` (0..1) and
    ``probabilities`` are on the prediction's grid.
    """
    tree = tree or load_tree()
    notes: list[str] = []
    if only_labels is not None:
        ref_label_map = partial_label_map(tree, only_labels, ref_label_map)
    pred_img, ref_img = _as_image(pred), _as_image(ref)
    unc_img = _as_image(uncertainty) if uncertainty is not None else None
    conf_img = _max_probability(probabilities, pred_img) if probabilities is not None else None
    if not same_grid(pred_img, ref_img):
        notes.append(
            f"prediction resampled with nearest neighbour from grid size {pred_img.GetSize()} spacing "
            f"{tuple(round(s, 4) for s in pred_img.GetSpacing())} to the reference grid size "
            f"{ref_img.GetSize()} spacing {tuple(round(s, 4) for s in ref_img.GetSpacing())}"
            + (" (uncertainty/probabilities linearly)" if unc_img is not None or conf_img is not None else ""))
        pred_img = _resample(pred_img, ref_img, nearest=True)
        if unc_img is not None:
            unc_img = _resample(sitk.Cast(unc_img, sitk.sitkFloat32), ref_img, nearest=False)
        if conf_img is not None:
            conf_img = _resample(conf_img, ref_img, nearest=False)
    pred_raw = sitk.GetArrayFromImage(pred_img)
    pred_arr = to_tree_labels(pred_raw, tree, name="prediction")
    if np.count_nonzero(pred_arr) != np.count_nonzero(pred_raw):
        notes.append("prediction contains numbers that are not leaves of the tree; counted as background")
    ref_arr = to_tree_labels(sitk.GetArrayFromImage(ref_img), tree, ref_label_map, name="reference")
    leaves_defined = defined_leaves(tree, ref_label_map)
    defined = tree.defined_nodes(tree.leaf_channel[n] for n in leaves_defined)
    if ref_label_map is not None:
        notes.append(f"reference mapped to aseg numbers; {len(leaves_defined)} of {len(tree.leaves)} leaves "
                     "defined by its scheme, the others are excluded (NaN)")

    spacing_kji = tuple(float(s) for s in reversed(ref_img.GetSpacing()))
    unit_ml = voxel_volume_ml(ref_img.GetSpacing())
    unc_arr = sitk.GetArrayFromImage(sitk.Cast(unc_img, sitk.sitkFloat32)) if unc_img is not None else None
    if unc_arr is None and conf_img is not None:
        unc_arr = 1.0 - sitk.GetArrayFromImage(conf_img)
    masks = _Masks(pred_arr, ref_arr, tree)
    rows = _structure_rows(masks, tree, defined, spacing_kji, unit_ml, unc_arr)
    swaps = detect_swaps(masks, tree, defined)
    summary = _summary(rows, swaps)
    summary["resampled"] = any(n.startswith("prediction resampled") for n in notes)

    partial = len(leaves_defined) < len(tree.leaves)
    if partial:
        summary["reference"] = "partial"
        summary["scored_leaves"] = sorted(leaves_defined, key=lambda n: tree.leaf_channel[n])

    calibration = None
    if unc_arr is not None:
        judged = pred_arr
        if partial:  # labels the scheme lacks are "none of these" (module docstring)
            scheme = [int(tree[n].label) for n in leaves_defined]  # type: ignore[arg-type]
            judged = np.where(np.isin(pred_arr, scheme), pred_arr, 0)
        mask = brain_mask(_with_geometry(judged, ref_img), _with_geometry(ref_arr, ref_img), mask_dilation_mm)
        error = judged != ref_arr
        what = "defined structures" if partial else "foreground"
        calibration = {"mask": f"union of prediction and reference {what} dilated by {mask_dilation_mm} mm"}
        if unc_img is not None:
            calibration["uncertainty"] = calibration_metrics(
                1.0 - unc_arr, unc_arr, error, mask, rows, masks, n_bins, "1 - uncertainty")
        if conf_img is not None:
            conf = sitk.GetArrayFromImage(conf_img)
            calibration["max_probability"] = calibration_metrics(
                conf, 1.0 - conf, error, mask, rows, masks, n_bins, "max class probability")
        primary = calibration.get("uncertainty") or calibration.get("max_probability")
        summary["ece"] = primary["ece"]
        summary["spearman_uncertainty_vs_error_voxels"] = primary["spearman_uncertainty_vs_error_voxels"]
        summary["spearman_mean_uncertainty_vs_dice"] = primary["spearman_mean_uncertainty_vs_dice"]
    return EvaluationReport(rows, summary, swaps, calibration, notes,
                            pred=_with_geometry(pred_arr, ref_img), ref=_with_geometry(ref_arr, ref_img))


def _with_geometry(arr: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(arr.astype(np.uint16))
    image.CopyInformation(grid)
    return image


# ----------------------------------------------------------------------------- report files
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def structures_csv_text(report: EvaluationReport) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STRUCTURE_COLUMNS)
    for s in report.structures:
        values = asdict(s)
        writer.writerow(["" if v is None else ("" if isinstance(v, float) and math.isnan(v) else v)
                         for v in (values[c] for c in STRUCTURE_COLUMNS)])
    return buf.getvalue()


def save_dice_png(report: EvaluationReport, path: str | os.PathLike, tree: LabelTree, title: str = "") -> None:
    """Horizontal bar chart of leaf Dice, sorted, in the structures' colours (excluded leaves listed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    leaves = sorted((s for s in report.structures if s.is_leaf and math.isfinite(s.dice)), key=lambda s: s.dice)
    fig = Figure(figsize=(8, 0.28 * max(len(leaves), 4) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [tuple(c / 255 for c in tree[s.node_id].color) for s in leaves]
    ax.barh(range(len(leaves)), [s.dice for s in leaves], color=colours, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(leaves)), [s.name for s in leaves], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice")
    mean = report.summary.get("dice_mean_leaves", math.nan)
    if math.isfinite(mean):
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    head = f"{title} - " if title else ""
    ax.set_title(f"{head}Dice per structure (mean {mean:.3f}, L/R swaps {report.summary.get('n_swapped_pairs', 0)})",
                 fontsize=10)
    excluded = report.summary.get("excluded_leaves", [])
    if excluded:
        fig.text(0.01, 0.005, "excluded (not in reference): " + ", ".join(excluded), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if excluded else 0, 1, 1))
    fig.savefig(os.fspath(path), dpi=100, format="png")


def save_reliability_png(calibration: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Reliability diagram (accuracy vs confidence per bin) for each confidence source."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for key, style in (("uncertainty", "o-"), ("max_probability", "s-")):
        part = calibration.get(key)
        if not part:
            continue
        bins = [b for b in part["bins"] if b["count"]]
        ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                label=f"{part['confidence_source']} (ECE {part['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability inside the brain mask", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100, format="png")


def report_names(stem: str) -> dict[str, str]:
    return {
        "csv": f"{stem}_eval.csv",
        "json": f"{stem}_eval.json",
        "overlay": f"{stem}_eval_overlay.png",
        "dice": f"{stem}_eval_dice.png",
        "reliability": f"{stem}_eval_reliability.png",
    }


def write_report(
    report: EvaluationReport,
    outdir: str | os.PathLike,
    stem: str,
    tree: LabelTree | None = None,
    image: sitk.Image | str | os.PathLike | None = None,
    title: str = "",
) -> dict[str, Path]:
    """CSV per node, JSON summary, prediction/reference contour overlay, Dice bar chart (atomically).

    ``image`` (e.g. the T1) is the overlay background; the reliability diagram is added when the
    report has calibration results.
    """
    from msdseg.outputs.overlay import save_comparison_png

    tree = tree or load_tree()
    outdir = Path(outdir)
    names = report_names(stem)
    kinds = ["csv", "json", "dice"] + (["overlay"] if report.pred is not None else []) \
        + (["reliability"] if report.calibration else [])
    with OutputGroup(outdir) as group:
        tmp = {k: group.path(names[k]) for k in kinds}
        tmp["csv"].write_text(structures_csv_text(report), encoding="utf-8")
        tmp["json"].write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        save_dice_png(report, tmp["dice"], tree, title)
        if "overlay" in tmp:
            background = _as_image(image) if image is not None else None
            caption = (f"{title} prediction (left) vs reference (right): mean leaf Dice "
                       f"{report.summary.get('dice_mean_leaves', math.nan):.3f}, "
                       f"L/R swapped pairs {report.summary.get('n_swapped_pairs', 0)}").strip()
            save_comparison_png(report.pred, report.ref, tmp["overlay"], tree, image=background, title=caption)
        if "reliability" in tmp:
            save_reliability_png(report.calibration, tmp["reliability"])  # type: ignore[arg-type]
    return {k: outdir / names[k] for k in kinds}

"""Which parts of a reference structure a segmentation misses, and what it calls them instead.

Why: a low Dice does not say whether a structure is drawn too thin everywhere or one of its parts
is missing. This splits each reference structure into connected parts and reports, per part, its
size, where it is (RAS centroid), how much of it the prediction gives the same label, and the labels
the prediction gives the rest. It is how the temporal-horn failure was traced to training atlases
that label the horn's posterior part lateral ventricle (docs/data_sources.md).

Usage: ``python -m msdseg.evaluation.diagnostics.missed_parts PRED_LABELS REF_LABELS --labels 5 44 [--min-voxels 50]``
(both in aseg numbers on the same grid, e.g. ``msdseg segment`` output and the reference).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from scipy import ndimage

from msdseg.core.errors import InputError
from msdseg.evaluation.metrics import read_label_pair


def missed_parts(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, label: int,
                 min_voxels: int = 50) -> list[dict[str, Any]]:
    """Per connected part (face neighbours, so parts touching only at an edge or corner stay apart;
    at least ``min_voxels``) of ``ref == label``, largest first: voxels, RAS centroid, share labelled
    ``label`` by ``pred``, and what ``pred`` says there."""
    parts, n = ndimage.label(ref == label)
    out = []
    for k in range(1, n + 1):
        mask = parts == k
        size = int(mask.sum())
        if size < min_voxels:
            continue
        centre = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
        values, counts = np.unique(pred[mask], return_counts=True)
        said = {int(v): int(c) for v, c in sorted(zip(values, counts), key=lambda vc: -vc[1])}
        out.append({"voxels": size, "centroid_ras": [round(float(c), 1) for c in centre],
                    "found": round(said.get(label, 0) / size, 3), "predicted": said})
    return sorted(out, key=lambda p: -p["voxels"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.diagnostics.missed_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("pred")
    p.add_argument("ref")
    p.add_argument("--labels", type=int, nargs="+", required=True, help="aseg numbers to examine")
    p.add_argument("--min-voxels", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        pred, ref, affine = read_label_pair(args.pred, args.ref)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    result = {lab: missed_parts(pred, ref, affine, lab, args.min_voxels) for lab in args.labels}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for lab, parts in result.items():
        print(f"label {lab}: {len(parts)} part(s) of at least {args.min_voxels} voxels")
        for part in parts:
            top = ", ".join(f"{v}: {c}" for v, c in list(part["predicted"].items())[:4])
            print(f"  {part['voxels']} voxels at RAS {part['centroid_ras']}: {100 * part['found']:.0f}% found; "
                  f"predicted there {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

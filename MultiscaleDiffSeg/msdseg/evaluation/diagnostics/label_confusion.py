"""Where each label's extra voxels come from and where its missing ones went.

Why: a volume error says a structure is too large, not at whose expense. Counting, for every label,
the reference labels under its false positives and the predicted labels over its false negatives
tells a boundary that moved (cortex called white matter all along the surface) from a prior that
inflates one structure into all its neighbours, and lets a peer's segmentation be read the same
way (docs/research/model_history.md: SAMSEG moves the same white-matter surface as msdseg).

Usage: ``python -m msdseg.evaluation.diagnostics.label_confusion PRED_LABELS REF_LABELS [--labels 2 3 41 42] [--top 4]
[--csv OUT.csv]`` (aseg numbers on one grid, e.g. ``msdseg segment`` output and the reference).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from msdseg.core.errors import InputError
from msdseg.evaluation.metrics import read_label_pair


def confusion_ml(pred: np.ndarray, ref: np.ndarray, voxel_ml: float) -> tuple[list[int], np.ndarray]:
    """The labels present in either map and the matrix ``m[i, j]``: mL predicted ``labels[i]`` where
    the reference says ``labels[j]``."""
    labels = sorted(set(np.unique(pred).tolist()) | set(np.unique(ref).tolist()))
    index = np.searchsorted(labels, pred.ravel()) * len(labels) + np.searchsorted(labels, ref.ravel())
    counts = np.bincount(index, minlength=len(labels) ** 2).reshape(len(labels), len(labels))
    return labels, counts * voxel_ml


def label_rows(labels: list[int], matrix: np.ndarray, top: int = 4) -> list[dict]:
    """Per label: true-positive mL, and the ``top`` largest sources of false positives (reference
    label under them) and destinations of false negatives (predicted label over them), in mL."""
    rows = []
    for i, lab in enumerate(labels):
        fp, fn = matrix[i].copy(), matrix[:, i].copy()
        fp[i] = fn[i] = 0.0
        rows.append({
            "label": lab, "true_ml": float(matrix[i, i]),
            "extra_ml": float(fp.sum()), "missing_ml": float(fn.sum()),
            "extra_from": {labels[j]: float(fp[j]) for j in np.argsort(-fp)[:top] if fp[j] > 0},
            "missing_to": {labels[j]: float(fn[j]) for j in np.argsort(-fn)[:top] if fn[j] > 0},
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.diagnostics.label_confusion", description=__doc__.split("\n\n")[0])
    p.add_argument("pred")
    p.add_argument("ref")
    p.add_argument("--labels", type=int, nargs="+", help="aseg numbers to report (default: all)")
    p.add_argument("--top", type=int, default=4, help="sources / destinations listed per label")
    p.add_argument("--csv", type=Path, help="also write the full matrix (mL) as CSV")
    args = p.parse_args(argv)
    try:
        return _report(args)
    except InputError as exc:
        print(f"error: {exc}")
        return 2


def _report(args: argparse.Namespace) -> int:
    """Print the rows ``args`` asks for and write the CSV; ``InputError`` for unusable inputs."""
    pred, ref, affine = read_label_pair(args.pred, args.ref)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    labels, matrix = confusion_ml(pred, ref, voxel_ml)
    wanted = set(args.labels) if args.labels else set(labels)
    for row in label_rows(labels, matrix, args.top):
        if row["label"] not in wanted:
            continue
        extra = ", ".join(f"{k}: {v:.2f}" for k, v in row["extra_from"].items()) or "-"
        missing = ", ".join(f"{k}: {v:.2f}" for k, v in row["missing_to"].items()) or "-"
        print(f"label {row['label']:5d}: agree {row['true_ml']:.2f} mL; extra {row['extra_ml']:.2f} mL "
              f"(reference said {extra}); missing {row['missing_ml']:.2f} mL (predicted {missing})")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["predicted \\ reference"] + labels)
            for lab, values in zip(labels, matrix):
                w.writerow([lab] + [f"{v:.3f}" for v in values])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

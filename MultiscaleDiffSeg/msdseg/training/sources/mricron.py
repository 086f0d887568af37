"""Colin27 with the AAL atlas (Debian ``mricron-data``): a held-out real scan with a manual atlas.

MRIcron's templates include ``ch2.nii.gz`` (Colin27: one person's brain, 27 scans averaged, MNI
space) and ``aal.nii.gz``, the Automated Anatomical Labeling atlas (Tzourio-Mazoyer et al. 2002),
drawn by hand on that very brain and stored on the same grid.  No training source contains this
brain, so it is an independent yardstick; it is evaluation data only (role ``heldout``).

AAL labels cortex in gyral parcels and a few deep structures; only twelve of them are structures
of ours.  Those become their aseg numbers and **every other voxel becomes 0**, and the manifest
entry says ``"reference": "partial"``: 0 here means "none of these twelve", not background, so
evaluation scores the twelve leaves alone (``msdseg.evaluation.heldout``).  AAL's boundaries are
macroscopic and are not FreeSurfer's aseg protocol (its caudate and hippocampus are larger), so a
Dice against it mixes accuracy with convention.

The map is cropped to the box of everything AAL labels (+ 8 mm) rather than to the twelve
structures, so the companion T1 (``ch2.nii.gz``, copied exactly) keeps the whole brain.
"""
from __future__ import annotations

import numpy as np

from msdseg.training.sources.common import Companion, Context, copy_licences, finish_map
from msdseg.training.sources.debs import DebPin, DebReader
from msdseg.training.sources.labelmap import apply_table
from msdseg.training.sources.manifest import MapEntry

MRICRON_DEB = DebPin(
    package="mricron-data", version="1.2.20211006+dfsg-4", architecture="all",
    sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
    pool_url="http://deb.debian.org/debian/pool/main/m/mricron/mricron-data_1.2.20211006+dfsg-4_all.deb",
    licence="BSD-3-clause (MRIcron, Chris Rorden, per the Debian copyright file's 'Files: *'; "
            "it states no separate terms for the Colin27 and AAL templates)",
)
TEMPLATES = "usr/share/mricron/templates/"
AAL = TEMPLATES + "aal.nii.gz"
AAL_NAMES = TEMPLATES + "aal.nii.txt"
COLIN27 = TEMPLATES + "ch2.nii.gz"
COPYRIGHT = "usr/share/doc/mricron-data/copyright"

#: AAL number -> (its name in ``aal.nii.txt``, our aseg number); the name is checked on every build.
AAL_TO_ASEG: dict[int, tuple[str, int]] = {
    37: ("Hippocampus_L", 17), 38: ("Hippocampus_R", 53),
    41: ("Amygdala_L", 18), 42: ("Amygdala_R", 54),
    71: ("Caudate_L", 11), 72: ("Caudate_R", 50),
    73: ("Putamen_L", 12), 74: ("Putamen_R", 51),
    75: ("Pallidum_L", 13), 76: ("Pallidum_R", 52),
    77: ("Thalamus_L", 10), 78: ("Thalamus_R", 49),
}

T1_NOTE = ("Colin27 ch2.nii.gz from the same package: one person's brain, 27 T1 scans averaged, MNI space, "
           "uint8 whole head on the atlas's own grid (copied exactly, cropped with the labels)")
INDEPENDENT_NOTE = ("Colin27 (one MNI volunteer) is in no training source as far as their documentation goes: "
                    "SAMSEG's and the GCA's training subjects, cvs_avg35, IBSR and the six Allen donors")
CONVENTION_NOTE = ("AAL is a macroscopic atlas drawn on this brain, not FreeSurfer's aseg protocol: its "
                   "caudate and hippocampus are larger than an aseg-style segmentation of the same scan, so "
                   "Dice here mixes accuracy with convention; only the 12 defined leaves are truth")


def aal_names(text: str) -> dict[int, str]:
    """``aal.nii.txt`` (lines ``number name code``) as number -> name."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def aal_table(values: np.ndarray, names: dict[int, str]) -> dict[int, int]:
    """Output value of every AAL number in ``values``: the twelve of :data:`AAL_TO_ASEG`, else 0.

    Raises ``ValueError`` when a mapped number carries another name in this AAL version (a
    renumbered atlas must not put the thalamus where the caudate was) or when the map holds a
    number its names file does not list.
    """
    for number, (name, _) in AAL_TO_ASEG.items():
        if names.get(number) != name:
            raise ValueError(f"AAL {number} is {names.get(number)!r} in {AAL_NAMES}, expected {name!r}")
    stray = sorted(int(v) for v in np.unique(values) if v != 0 and int(v) not in names)
    if stray:
        raise ValueError(f"AAL map holds numbers {stray} that {AAL_NAMES} does not name")
    table = {int(v): 0 for v in np.unique(values)}
    table.update({number: aseg for number, (_, aseg) in AAL_TO_ASEG.items()})
    return table


def build_mricron(ctx: Context, deb: DebReader) -> list[MapEntry]:
    """The ``mricron`` source of ``prepare-data``: Colin27's twelve AAL structures and its T1, held out."""
    lic = copy_licences(ctx, "mricron", deb, [COPYRIGHT])
    aal = deb.image(AAL)
    t1 = deb.image(COLIN27)
    labels = np.asarray(aal.dataobj).astype(np.int32)
    table = aal_table(labels, aal_names(deb.text(AAL_NAMES)))
    entry = finish_map(
        ctx, source="mricron", name="colin27", labels=labels, affine=aal.affine,
        relabel=lambda a: apply_table(a, table), role="heldout", licence=MRICRON_DEB.licence,
        licence_files=lic, origin=f"{MRICRON_DEB.filename}: {AAL}",
        t1=Companion(np.asarray(t1.dataobj), t1.affine, T1_NOTE), box_mask=labels != 0,
    )
    expected = sorted(aseg for _, aseg in AAL_TO_ASEG.values())
    if sorted(entry.defined) != expected:
        raise ValueError(f"mricron: defined leaves {sorted(entry.defined)}, expected {expected}")
    entry.reference = "partial"
    entry.independent = True
    entry.independent_note = INDEPENDENT_NOTE
    entry.convention_note = CONVENTION_NOTE
    return [entry]

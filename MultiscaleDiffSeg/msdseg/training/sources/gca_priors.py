"""FreeSurfer's aseg atlas (``RB_all`` GCA): label priors of manually labelled brains, every 2 mm.

The GCA stores, for every voxel of a 2 mm grid in FreeSurfer's Talairach (MNI305) space, the
labels seen there in its training subjects and their frequencies (:mod:`gca` reads it).  That
is a second probabilistic atlas next to SAMSEG's, with aseg numbering and the FreeSurfer aseg
protocol (temporal horns, hippocampus and amygdala drawn as the held-out aseg draws them).
Here we

1. map its FreeSurfer labels through :func:`labelmap.freesurfer_table`, the same table as every
   other source (vessels, optic chiasm, undetermined -> ignore; choroid plexus -> ventricle);
2. give WM-hypointensity mass (no side) to the white matter of the nearest hemisphere, sides
   taken from the argmax of the raw labels on the 2 mm grid;
3. sum the priors of each output value per voxel and normalise (voxels no subject reached are
   background), reorient to RAS and crop the labelled box + 8 mm;
4. write ``gca/priors_2mm.npz`` (the GCA's own 2 mm voxels, no resampling) and, as the atlas's
   label map, ``gca/gca_argmax_labels.nii.gz``: the noise-free draw of
   :func:`msdseg.training.priors.sample_label_map` at 1 mm, i.e. the most likely label after the
   sampler's upsampling, so the map and the sampled maps agree where the atlas is certain.

The atlas has no skull or scalp labels: outside the brain everything is background, as in the
fsaverage and cvs_avg35 maps.
"""
from __future__ import annotations

import numpy as np

from msdseg.core.labels import LabelTree
from msdseg.training.sources.atlas_priors import affine_1mm_of, write_prior_atlas
from msdseg.training.sources.common import Context, copy_licences
from msdseg.training.sources.gca import GcaPriors, read_gca
from msdseg.training.sources.grid import MARGIN_MM, apply_box, crop_box, reorient_to_ras
from msdseg.training.sources.labelmap import (LEFT_WM, NEAREST_WM, RIGHT_WM, apply_table, freesurfer_table,
                                              nearest_side, side_map)
from msdseg.training.sources.manifest import MapEntry
from msdseg.training.sources.wheels import PINS, WheelReader

GCA_MEMBER = "smriprep_freesurfer732/freesurfer/average/RB_all_2020-01-02.gca"


def raw_argmax(gca: GcaPriors) -> np.ndarray:
    """Most likely FreeSurfer label per prior voxel (0 where no subject reached), prior-grid shape.

    Ties go to the label listed first in the file.
    """
    voxel = gca.voxel_of_entry()
    order = np.lexsort((-gca.priors, voxel))  # grouped by voxel (same group sizes), best first
    counts = np.diff(gca.offsets)
    best = np.zeros(len(counts), np.int32)
    filled = counts > 0
    best[filled] = gca.labels[order][gca.offsets[:-1][filled]]
    return best.reshape(gca.header.prior_shape)


def merged_priors(gca: GcaPriors, tree: LabelTree) -> tuple[np.ndarray, list[int]]:
    """Priors per output value on the GCA's prior grid (float32 ``[L, X, Y, Z]``) and the values."""
    table = freesurfer_table(np.unique(gca.labels), tree)
    spacing = np.linalg.norm(gca.vox2ras[:3, :3], axis=0)
    near = nearest_side(side_map(apply_table(raw_argmax(gca), table), tree), spacing).ravel()
    voxel = gca.voxel_of_entry()
    out = apply_table(gca.labels, table)
    pending = out == NEAREST_WM
    out[pending] = np.where(near[voxel[pending]] == 1, LEFT_WM, RIGHT_WM)
    n_vox = len(gca.offsets) - 1
    total = np.bincount(voxel, weights=gca.priors, minlength=n_vox)
    empty = total <= 0
    scale = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, total))
    values = sorted({int(v) for v in np.unique(out)} | {0})
    stack = np.empty((len(values),) + gca.header.prior_shape, np.float32)
    for k, value in enumerate(values):
        mine = out == value
        vol = np.bincount(voxel[mine], weights=gca.priors[mine], minlength=n_vox) * scale
        if value == 0:
            vol[empty] = 1.0
        stack[k] = vol.reshape(gca.header.prior_shape)
    return stack, values


def crop_to_ras(stack: np.ndarray, values: list[int], vox2ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient priors to RAS and crop them to the box of non-background argmax + 8 mm.

    Returns the cropped priors and their (2 mm) affine; outside the atlas the background prior is 1.
    """
    canon = np.stack([reorient_to_ras(vol, vox2ras)[0] for vol in stack])
    canon_affine = reorient_to_ras(stack[0], vox2ras)[1]
    margin = int(np.ceil(MARGIN_MM / np.linalg.norm(canon_affine[:3, 0])))
    lo, hi = crop_box(np.argmax(canon, axis=0) != values.index(0), margin)
    out = [apply_box(vol, canon_affine, lo, hi, fill=1.0 if v == 0 else 0.0)[0] for vol, v in zip(canon, values)]
    return np.stack(out), apply_box(canon[0], canon_affine, lo, hi)[1]


def argmax_map(priors_2mm: np.ndarray, values: list[int]) -> np.ndarray:
    """The sampler's noise-free draw at 1 mm (see the module docstring)."""
    from msdseg.training.priors import PriorSampleConfig, sample_label_map

    cfg = PriorSampleConfig(temperature=(1.0, 1.0), noise_std=(0.0, 0.0))
    return sample_label_map(priors_2mm, np.array(values, np.int32), np.random.default_rng(0), cfg)


def build_gca(ctx: Context, wheel: WheelReader) -> tuple[list[MapEntry], dict]:
    """The ``gca`` source of ``prepare-data``: its label map entry and its priors (``extras``)."""
    pin = PINS["gca"]
    lic = copy_licences(ctx, "gca", wheel, [wheel.dist_info("LICENSE.FreeSurfer.txt")])
    ctx.report(0.1, "gca: reading the atlas")
    gca = read_gca(wheel.read(GCA_MEMBER))
    ctx.report(0.4, "gca: merging priors")
    stack, values = merged_priors(gca, ctx.tree)
    priors, affine_2 = crop_to_ras(stack, values, gca.vox2ras)
    del stack
    priors16 = priors.astype(np.float16)
    ctx.report(0.7, "gca: most likely labels at 1 mm")
    labels_1mm = argmax_map(priors16, values)
    entry, extras = write_prior_atlas(
        ctx, source="gca", name="gca_argmax", label_map=labels_1mm, affine_1mm=affine_1mm_of(affine_2),
        priors_2mm=priors16, labels=values, origin=GCA_MEMBER, licence=pin.licence, licence_files=lic)
    extras.update({
        "gca_version": gca.header.version, "gca_prior_shape": list(gca.header.prior_shape),
        "gca_prior_spacing_mm": gca.header.prior_spacing,
        "gca_fs_labels": sorted(int(v) for v in np.unique(gca.labels)),
        "heldout_note": "fsaverage (held out) is very likely built from the same subjects: not independent",
    })
    ctx.report(1.0, f"gca: {len(values)} output values, map {labels_1mm.shape}")
    return [entry], extras

"""SynthSeg-style image generator: endless random T1-like (and not so T1-like) images from label maps.

One call draws a random spatial transform (affine + smooth elastic, optional left/right mirror that
also swaps left and right labels), samples the label map on a generation grid at half the target
spacing, paints a Gaussian-mixture image (random contrast per structure, with a T1-like prior part
of the time), blurs it (random slice thickness), multiplies a smooth bias field, averages it down
to the target spacing (partial volume), adds noise and a gamma change, and normalises it exactly
as inference does.  Targets are the label map averaged down to the target spacing (soft labels),
so every depth's reference is the one a perfect scanner would give at that resolution.

Label maps come from :mod:`msdseg.training.sources`: aseg numbers for structures, 255 for "ignore in the
loss", and numbers >= 1000 for generation-only tissue (skull, scalp, eyes) that is background for
the loss.  Maps without non-brain tissue get random skull/scalp shells part of the time, and brain
voxels that a partial map leaves unlabelled get their own tissue class so they do not look like
air.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msdseg.core.geometry import ModelGrid, normalise_intensities
from msdseg.core.labels import LabelTree

IGNORE = 255
SHELL_PAD = 24  # voxels of padding for shells (thickest shell is below 20 mm)
GEN_CSF, GEN_SKULL, GEN_SCALP, GEN_UNLABELLED_BRAIN = 1024, 1165, 1258, 1999

# T1-like mean intensities (0..1) by aseg number; generation-only classes included.
_T1_MEANS = {
    0: 0.02, 2: 0.80, 41: 0.80, 3: 0.50, 42: 0.50, 4: 0.12, 43: 0.12, 5: 0.15, 44: 0.15,
    7: 0.75, 46: 0.75, 8: 0.52, 47: 0.52, 10: 0.66, 49: 0.66, 11: 0.55, 50: 0.55, 12: 0.60, 51: 0.60,
    13: 0.70, 52: 0.70, 14: 0.12, 15: 0.12, 16: 0.72, 17: 0.50, 53: 0.50, 18: 0.52, 54: 0.52,
    24: 0.12, 26: 0.58, 58: 0.58, 28: 0.70, 60: 0.70, IGNORE: 0.5,
    GEN_CSF: 0.12, GEN_SKULL: 0.10, GEN_SCALP: 0.70, GEN_UNLABELLED_BRAIN: 0.72, 1259: 0.15,
}


#: cerebrospinal fluid spaces inside the brain that :func:`resize_ventricles` grows or shrinks
VENTRICLES = (4, 43, 5, 44, 14)
#: the ventricles' thin temporal (inferior lateral) horns, changed less (``horn_scale``)
TEMPORAL_HORNS = (5, 44)
#: tissue that gives way to them (and fills them when they shrink): white matter, the nuclei that
#: line the ventricles, hippocampus/amygdala (temporal horns), choroid plexus, other CSF
VENTRICLE_NEIGHBOURS = (2, 41, 10, 49, 11, 50, 17, 53, 18, 54, 28, 60, 31, 63, 24, GEN_UNLABELLED_BRAIN)


def _spread_layers(part: torch.Tensor, donor: torch.Tensor, taker: torch.Tensor, layers: int,
                   rng: np.random.Generator, keep_layer=None) -> torch.Tensor:
    """``layers`` face-connected layers of the ``donor`` labels spread into ``taker`` voxels.

    ``donor`` and ``taker`` are boolean lookup tables over label numbers.  Where several donor
    labels touch a voxel, a random per-call priority decides which one it takes.  ``keep_layer(k)``
    (optional) returns a boolean mask of where layer ``k`` may be added, for thickness that varies
    from region to region.
    """
    top = donor.numel()
    # random priorities (1..top) decide between candidate labels; 0 means "no candidate"
    priority = torch.from_numpy(rng.permutation(top).astype(np.float32) + 1.0)
    by_priority = torch.empty(top + 1, dtype=part.dtype)
    by_priority[priority.long()] = torch.arange(top, dtype=part.dtype)
    for k in range(layers):
        li = part.long()
        code = torch.where(donor[li], priority[li], torch.zeros(()))[None, None]
        # the 6-neighbourhood (a face-connected layer is about one voxel thick in every direction)
        best = torch.maximum(torch.maximum(F.max_pool3d(code, (3, 1, 1), 1, (1, 0, 0)),
                                           F.max_pool3d(code, (1, 3, 1), 1, (0, 1, 0))),
                             F.max_pool3d(code, (1, 1, 3), 1, (0, 0, 1)))[0, 0]
        change = taker[li] & (best > 0)
        if keep_layer is not None:
            change = change & keep_layer(k)
        part = torch.where(change, by_priority[best.long()], part)
    return part


def _lookup(labels: torch.Tensor, members) -> torch.Tensor:
    """Boolean table over the label numbers of ``labels``: True for ``members``."""
    top = int(labels.max()) + 1
    table = torch.zeros(top, dtype=torch.bool)
    table[[lab for lab in members if lab < top]] = True
    return table


def _box_around(idx: torch.Tensor, margin: int) -> tuple[slice, ...]:
    """Bounding box of the voxel indices ``idx`` (N, 3), widened by ``margin`` voxels."""
    lo = (idx.min(0).values - margin).clamp_min(0).tolist()
    hi = (idx.max(0).values + margin + 1).tolist()
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def resize_ventricles(labels: torch.Tensor, change_mm: float, spacing_mm: float, rng: np.random.Generator,
                      horn_scale: float = 1.0) -> torch.Tensor:
    """Ventricles grown (``change_mm`` > 0) or shrunk by about ``|change_mm|``, one voxel layer at a time.

    Why: the complete real-anatomy training maps (cvs_avg35, IBSR) have small ventricles (lateral
    ventricles 19 mL against 35-43 mL in SAMSEG's atlas and fsaverage) and the large caudate and
    thalamus that go with them, and a model trained on them over-segments the nuclei and
    under-segments the ventricles of a larger-ventricle brain (docs/research/model_history.md).
    Ventricle size varies several-fold between healthy adults and more with age and atrophy, so
    the generator varies it.  Growth takes only :data:`VENTRICLE_NEIGHBOURS` (never cortex,
    putamen, pallidum or background); a shrinking ventricle's rim takes a neighbouring tissue's
    label.  Where several candidates touch a voxel a random per-call priority decides.

    ``horn_scale`` < 1 changes the temporal horns (5, 44) by only that share of ``change_mm``,
    with a fractional last layer where a smooth random field allows.  Why: a horn is one or two
    voxels thick, so a whole layer multiplies its volume (the same millimetres grow the horns by a
    far larger factor than the rest of the lateral ventricles), and a model trained on full layers
    over-segments the horns (docs/research/model_history.md).  1 keeps the single pass
    of earlier runs, voxel for voxel.
    """
    layers = int(round(abs(change_mm) / spacing_mm))
    if layers == 0:
        return labels
    vent, near = _lookup(labels, VENTRICLES), _lookup(labels, VENTRICLE_NEIGHBOURS)
    idx = torch.nonzero(vent[labels.long()])
    if idx.numel() == 0:
        return labels
    # work inside the ventricles' bounding box (plus the layers to add): a tenth of the volume
    box = _box_around(idx, layers + 1)
    grow = change_mm > 0
    # with a share of 1 the horns move with the rest in one pass (as in earlier runs)
    body = vent if horn_scale == 1.0 else _lookup(labels, [lab for lab in VENTRICLES if lab not in TEMPORAL_HORNS])
    part = _spread_layers(labels[box], body if grow else near, near if grow else body, layers, rng)
    amount = abs(change_mm) * horn_scale / spacing_mm
    if horn_scale != 1.0 and amount > 1e-6:
        horns, near = _lookup(part, TEMPORAL_HORNS), _lookup(part, VENTRICLE_NEIGHBOURS)
        part = _spread_fraction(part, horns if grow else near, near if grow else horns, amount, rng)
    out = labels.clone()
    out[box] = part
    return out


def _spread_fraction(part: torch.Tensor, donor: torch.Tensor, taker: torch.Tensor, amount: float,
                     rng: np.random.Generator) -> torch.Tensor:
    """:func:`_spread_layers` for a fractional number of layers: ``ceil(amount)`` layers, the last
    only where a smooth random field over ``part`` (scaled to [0, 1)) lies below its fraction, so
    the change is continuous on average and comes in a few large patches along the surface."""
    coarse = torch.from_numpy(rng.random((1, 1, 4, 4, 4)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(part.shape), mode="trilinear", align_corners=True)[0, 0]
    field = (field - field.min()) / (field.max() - field.min() + 1e-6)
    return _spread_layers(part, donor, taker, int(math.ceil(amount - 1e-6)), rng, lambda k: field < (amount - k))


#: deep grey nuclei that :func:`resize_nuclei` grows or shrinks, as (left, right, same-side white
#: matter): thalamus, caudate, putamen, pallidum, accumbens area, ventral diencephalon
NUCLEI = ((10, 49), (11, 50), (12, 51), (13, 52), (26, 58), (28, 60))
_WHITE_MATTER = (2, 41)


def resize_nuclei(labels: torch.Tensor, change_mm: dict[int, float], spacing_mm: float,
                  rng: np.random.Generator) -> torch.Tensor:
    """Each nucleus pair in ``change_mm`` (keyed by the left label of :data:`NUCLEI`) grown into
    its own side's white matter (> 0) or shrunk back into it (< 0) by about ``|change_mm|``.

    Why: on renders of the held-out labels, where every structure has its own clear intensity,
    a model trained without this change still made thalamus, pallidum, accumbens, ventral DC and
    caudate too large (docs/research/model_history.md): a size prior learned from the complete
    training maps, whose nuclei are large (cvs_avg35 thalamus 11 mL and caudate 5.1 mL per side;
    healthy adults' are nearer 7-8 mL and 3.5-4 mL in FreeSurfer's measurements).  Nucleus size
    varies between people and shrinks with age, and the contrast between most nuclei and white
    matter in T1 is weak, so a model that has seen only a few sizes answers with its prior.  Whole
    voxel layers are added or removed; a fractional last layer goes only where a smooth random
    field allows, so the change is continuous on average and uneven along the surface.  Shrinking
    hands the rim to the white matter it touches (a rim that touches only another nucleus or a
    ventricle stays).
    """
    amounts = {left: abs(change_mm.get(left, 0.0)) / spacing_mm for left, _ in NUCLEI}
    chosen = [pair for pair in NUCLEI if amounts[pair[0]] > 1e-6]
    if not chosen:
        return labels
    idx = torch.nonzero(_lookup(labels, [lab for pair in chosen for lab in pair])[labels.long()])
    if idx.numel() == 0:
        return labels
    # the nuclei sit together in the middle of the brain: work inside their joint bounding box
    box = _box_around(idx, max(int(math.ceil(amounts[left] - 1e-6)) for left, _ in chosen) + 1)
    part = labels[box].clone()
    brain_fill = (GEN_UNLABELLED_BRAIN,)  # partial maps' unlabelled brain stands in for white matter
    for left, right in chosen:
        grow = change_mm[left] > 0
        for nucleus, white in ((left, _WHITE_MATTER[0]), (right, _WHITE_MATTER[1])):
            nuc, wm = _lookup(part, (nucleus,)), _lookup(part, (white,) + brain_fill)
            part = _spread_fraction(part, nuc if grow else wm, wm if grow else nuc, amounts[left], rng)
    out = labels.clone()
    out[box] = part
    return out


@dataclass
class SynthConfig:
    """Ranges of the random generator (defaults follow SynthSeg's spirit, tuned for T1)."""

    rotation_deg: float = 15.0
    scale: float = 0.12
    shear: float = 0.04
    shift_mm: float = 12.0
    elastic_mm: float = 3.0
    elastic_grid: int = 5
    flip_prob: float = 0.5
    t1_prior_prob: float = 0.7
    intensity_jitter: float = 0.10
    std_max: float = 0.06
    blur_max_mm: float = 2.0  # Gaussian sigma; templates and averaged scans are this smooth
    thick_slice_prob: float = 0.3
    thick_slice_max_mm: float = 6.0
    bias_std: float = 0.3
    noise_max: float = 0.04
    gamma_std: float = 0.25
    shell_prob: float = 0.6
    fov_prob: float = 0.2  # share of cases scanned with a field of view that cuts the brain
    fov_cut_max: float = 0.3  # largest share of the brain's extent a cut removes
    # share of cases whose ventricles grow or shrink (0 keeps the random stream of older runs)
    ventricle_change_prob: float = 0.0
    ventricle_change_mm: tuple[float, float] = (-1.5, 3.5)  # uniform; > 0 grows
    ventricle_horn_scale: float = 1.0  # share of that change the temporal horns get (1: all of it)
    # share of cases whose deep grey nuclei change size, each pair with this probability again
    # (0 keeps the random stream of older runs)
    nuclei_change_prob: float = 0.0
    nuclei_change_mm: tuple[float, float] = (-1.5, 1.0)  # uniform per pair; > 0 grows
    # share of cropped cases centred on one of ``focus_labels`` (0 keeps the random stream of older
    # runs): small structures that uniform crops rarely hold whole get whole, well-placed crops
    focus_prob: float = 0.0
    focus_labels: tuple[int, ...] = ()
    focus_jitter_mm: float = 8.0

    def whole_brain_scan(self, **changes) -> "SynthConfig":
        """These ranges without thick slices or a field of view that cuts the brain: the clean
        whole-brain scan that calibration and the synthetic held-out score draw (plus ``changes``)."""
        return replace(self, thick_slice_prob=0.0, fov_prob=0.0, **changes)


@dataclass
class LabelSource:
    """One label map on a 1 mm RAS grid, pre-processed for fast sampling."""

    name: str
    classes: np.ndarray  # generation class c -> label number (aseg / 255 / >= 1000)
    volume: torch.Tensor  # (1, 1, X, Y, Z) float32 class indices
    origin_ras: np.ndarray  # RAS of voxel (0, 0, 0)
    spacing_mm: float
    brain_centre: np.ndarray
    brain_lo: np.ndarray
    brain_hi: np.ndarray
    defined_labels: set[int]
    outside_distance_mm: torch.Tensor | None = None  # distance outside the brain, for shells
    has_nonbrain: bool = False
    # groups of leaf label numbers whose union this map labels but whose split it does not
    # (``LabelTree.defined_nodes``; the manifest's ``merged``)
    merged_labels: tuple[frozenset[int], ...] = ()

    @classmethod
    def from_array(
        cls, name: str, labels: np.ndarray, affine: np.ndarray, defined_labels: set[int] | None = None,
        merged_labels: Iterable[Iterable[int]] = (),
    ) -> "LabelSource":
        """``labels`` (X, Y, Z) on an axis-aligned RAS grid described by ``affine``."""
        from scipy import ndimage

        if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
            raise ValueError(f"{name}: label map must be on an axis-aligned RAS grid")
        spacing = float(affine[0, 0])
        labels = labels.astype(np.int32)
        brain = (labels > 0) & (labels < 1000) & (labels != IGNORE) | (labels == IGNORE)
        has_nonbrain = bool(np.any(labels >= 1000))
        if defined_labels is None:
            defined_labels = set(int(v) for v in np.unique(labels) if 0 < v < 1000 and v != IGNORE)
        if not has_nonbrain:
            # room for random skull / scalp shells around a skull-stripped map
            labels = np.pad(labels, SHELL_PAD)
            brain = np.pad(brain, SHELL_PAD)
            affine = affine.copy()
            affine[:3, 3] -= spacing * SHELL_PAD
        # Brain tissue that a partial map leaves unlabelled (white matter in a cortex+subcortex
        # map) gets its own tissue class; in complete maps unlabelled gaps are CSF-like background.
        fill = np.zeros(labels.shape, bool)
        if not ({2, 41} & set(defined_labels)):
            fill = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=4)) & (labels == 0)
        if fill.any():
            labels = labels.copy()
            labels[fill] = GEN_UNLABELLED_BRAIN
            brain = brain | fill
        idx = np.argwhere(brain)
        lo, hi = idx.min(0), idx.max(0)
        origin = affine[:3, 3].astype(float)
        classes, inverse = np.unique(labels, return_inverse=True)
        vol = torch.from_numpy(inverse.reshape(labels.shape).astype(np.float32))[None, None]
        dist = None
        if not has_nonbrain:
            dist = torch.from_numpy(ndimage.distance_transform_edt(~brain).astype(np.float32) * spacing)[None, None]
        return cls(
            name=name,
            classes=classes.astype(np.int32),
            volume=vol,
            origin_ras=origin,
            spacing_mm=spacing,
            brain_centre=origin + spacing * (lo + hi) / 2.0,
            brain_lo=origin + spacing * lo,
            brain_hi=origin + spacing * hi,
            defined_labels=set(int(v) for v in defined_labels),
            outside_distance_mm=dist,
            has_nonbrain=has_nonbrain,
            merged_labels=tuple(frozenset(int(v) for v in g) for g in merged_labels),
        )

    @classmethod
    def from_file(
        cls, path: str | Path, defined_labels: set[int] | None = None, merged_labels: Iterable[Iterable[int]] = ()
    ) -> "LabelSource":
        import nibabel as nib

        img = nib.load(str(path))
        return cls.from_array(Path(path).name, np.asarray(img.dataobj), img.affine, defined_labels, merged_labels)


@dataclass
class TrainingSample:
    """One synthetic case at the entry depth (tensors without batch axis)."""

    image: torch.Tensor  # (1, X, Y, Z), normalised
    coords: torch.Tensor  # (3, X, Y, Z)
    target: torch.Tensor  # (C, X, Y, Z), soft one-hot
    weight: torch.Tensor  # (1, X, Y, Z), 0 where ignored
    channel_mask: torch.Tensor  # (C,) bool
    internal_mask: torch.Tensor  # (K,) bool
    source: str = ""
    merged_mask: torch.Tensor | None = None  # (C,) bool: leaves labelled only as a merged group
    flipped: bool = False


class SyntheticGenerator:
    """Draws :class:`TrainingSample` objects from a list of label sources."""

    def __init__(self, sources: list, tree: LabelTree, config: SynthConfig | None = None):
        """``sources``: :class:`LabelSource` objects, or samplers with ``name`` and
        ``label_source(rng) -> LabelSource`` (see :mod:`msdseg.training.priors`)."""
        if not sources:
            raise ValueError("no label sources to synthesise from")
        self.sources = sources
        self.tree = tree
        self.cfg = config or SynthConfig()
        self._swap = {}
        for leaf in tree.leaves:
            twin = tree.twin(leaf.id)
            if twin:
                self._swap[int(leaf.label)] = int(tree[twin].label)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ public
    def sample(
        self,
        rng: np.random.Generator,
        spacing_mm: float,
        crop_shape: tuple[int, int, int] | None = None,
        source_index: int | None = None,
    ) -> TrainingSample:
        src = self.sources[self._pick_source(rng) if source_index is None else source_index]
        if not isinstance(src, LabelSource):
            src = src.label_source(rng)  # a sampler that draws new maps (synth_priors)
        grid, centre = self._output_grid(rng, src, spacing_mm, crop_shape)
        factor = 2 if spacing_mm >= 2.0 * src.spacing_mm - 1e-6 else 1
        gen_grid = ModelGrid(
            tuple(np.array(grid.origin_ras) - (spacing_mm - spacing_mm / factor) / 2.0),
            spacing_mm / factor,
            tuple(s * factor for s in grid.shape),
        )
        flip = bool(rng.random() < self.cfg.flip_prob)
        cls_idx, dist = self._sample_labels(rng, src, gen_grid, flip)
        labels = torch.from_numpy(src.classes)[cls_idx.long()]
        if flip:
            labels = self._swap_sides(labels)
        if self.cfg.ventricle_change_prob > 0 and rng.random() < self.cfg.ventricle_change_prob:
            labels = resize_ventricles(labels, rng.uniform(*self.cfg.ventricle_change_mm), gen_grid.spacing_mm, rng,
                                       self.cfg.ventricle_horn_scale)
        if self.cfg.nuclei_change_prob > 0 and rng.random() < self.cfg.nuclei_change_prob:
            changes = {left: rng.uniform(*self.cfg.nuclei_change_mm) for left, _ in NUCLEI
                       if rng.random() < self.cfg.nuclei_change_prob}
            labels = resize_nuclei(labels, changes, gen_grid.spacing_mm, rng)
        if dist is not None and rng.random() < self.cfg.shell_prob:
            labels = self._add_shells(rng, labels, dist)
        image = self._paint(rng, labels, gen_grid.spacing_mm)
        if factor > 1:
            image = F.avg_pool3d(image[None, None], factor)[0, 0]
        image = self._corrupt_after(rng, image)
        target, weight = self._targets(labels, factor)
        if rng.random() < self.cfg.fov_prob:
            keep = self._field_of_view(rng, grid, src)
            image = image * keep  # nothing was acquired beyond the cut ...
            weight = weight * keep  # ... so nothing there is supervised either
        image = torch.from_numpy(normalise_intensities(image.numpy()))
        defined = self._defined_after_flip(src.defined_labels, flip)
        present = {self.tree.aseg_to_channel[l] for l in defined if l in self.tree.aseg_to_channel}
        merged = [{self.tree.aseg_to_channel[l] for l in self._defined_after_flip(set(g), flip)
                   if l in self.tree.aseg_to_channel} for g in src.merged_labels]
        defined_nodes = self.tree.defined_nodes(present, merged)
        merged_mask = np.zeros(self.tree.n_classes, dtype=bool)
        merged_mask[sorted(set().union(*merged))] = True
        return TrainingSample(
            image=image[None].float(),
            coords=torch.from_numpy(grid.coordinates(centre)),
            target=target,
            weight=weight,
            channel_mask=torch.from_numpy(self.tree.channel_mask(defined_nodes)),
            internal_mask=torch.from_numpy(self.tree.internal_mask(defined_nodes)),
            source=src.name,
            flipped=flip,
            merged_mask=torch.from_numpy(merged_mask),
        )

    def _pick_source(self, rng: np.random.Generator) -> int:
        """Each data source (the part of a map name before '/') is equally likely, then each of its
        maps: six partial donor maps from one package must not outweigh three complete atlases."""
        groups: dict[str, list[int]] = {}
        for i, src in enumerate(self.sources):
            groups.setdefault(src.name.split("/")[0], []).append(i)
        members = list(groups.values())[int(rng.integers(len(groups)))]
        return members[int(rng.integers(len(members)))]

    # ------------------------------------------------------------------ geometry
    def _output_grid(self, rng, src: LabelSource, spacing: float, crop_shape) -> tuple[ModelGrid, np.ndarray]:
        """The sampled grid and the centre of the full model grid it belongs to (for coordinates)."""
        shift = rng.normal(0, self.cfg.shift_mm / 2, 3).clip(-self.cfg.shift_mm, self.cfg.shift_mm)
        full = ModelGrid.centred(src.brain_centre + shift, spacing)
        if crop_shape is None:
            return full, full.centre_ras
        focus = self._focus_point(rng, src) if self.cfg.focus_prob > 0 else None
        if focus is not None:
            centre = focus
        else:
            centre = rng.uniform(src.brain_lo + 20.0, np.maximum(src.brain_hi - 20.0, src.brain_lo + 21.0))
        origin = centre - spacing * (np.array(crop_shape) - 1) / 2.0
        return ModelGrid(tuple(origin), spacing, tuple(crop_shape)), full.centre_ras

    def _focus_point(self, rng, src: LabelSource) -> np.ndarray | None:
        """With ``focus_prob``, the RAS position of a random voxel of one focus structure (plus a
        little jitter), else None. The crop is centred there in output space; the deformation
        applied afterwards moves the structure by at most a few mm, and a mirrored case lands on
        the twin structure, which is a focus structure too."""
        if rng.random() >= self.cfg.focus_prob:
            return None
        wanted = np.flatnonzero(np.isin(src.classes, self.cfg.focus_labels))
        if wanted.size == 0:
            return None
        cls = int(wanted[int(rng.integers(wanted.size))])  # a class index of src.volume
        idx = torch.nonzero(src.volume[0, 0] == float(cls))
        if idx.shape[0] == 0:
            return None
        voxel = idx[int(rng.integers(idx.shape[0]))].numpy().astype(float)
        jitter = rng.uniform(-self.cfg.focus_jitter_mm, self.cfg.focus_jitter_mm, 3)
        return src.origin_ras + voxel * src.spacing_mm + jitter

    def _field_of_view(self, rng, grid: ModelGrid, src: LabelSource) -> torch.Tensor:
        """1 inside, 0 beyond one or two planes cutting into the brain (a scan whose slab
        misses the vertex, the cerebellum or a temporal pole), on the output grid."""
        keep = torch.ones(grid.shape)
        half = (src.brain_hi - src.brain_lo) / 2.0
        for axis in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
            side = 1.0 if rng.random() < 0.5 else -1.0
            limit = src.brain_centre[axis] + side * half[axis] * (1.0 - 2.0 * rng.uniform(0.05, self.cfg.fov_cut_max))
            ras = grid.origin_ras[axis] + grid.spacing_mm * torch.arange(grid.shape[axis], dtype=torch.float32)
            inside = (side * (ras - limit) <= 0).float()
            shape = [1, 1, 1]
            shape[axis] = -1
            keep = keep * inside.view(shape)
        return keep

    def _sample_labels(self, rng, src: LabelSource, grid: ModelGrid, flip: bool):
        """Nearest-neighbour class indices of ``src`` on ``grid`` under a random deformation."""
        cfg = self.cfg
        axes = [torch.arange(n, dtype=torch.float32) * grid.spacing_mm + o for n, o in zip(grid.shape, grid.origin_ras)]
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3) RAS
        centre = torch.from_numpy(src.brain_centre).float()
        rel = pts - centre
        if flip:
            rel = rel * torch.tensor([-1.0, 1.0, 1.0])
        mat = torch.from_numpy(self._random_affine(rng)).float()
        src_pts = rel @ mat.T + centre
        if cfg.elastic_mm > 0:
            src_pts = src_pts + self._elastic(rng, grid.shape)
        # to normalised grid_sample coordinates of the source volume (X, Y, Z) -> (z, y, x) order
        size = torch.tensor(src.volume.shape[2:], dtype=torch.float32)
        idx = (src_pts - torch.from_numpy(src.origin_ras).float()) / src.spacing_mm
        norm = idx / (size - 1) * 2 - 1
        g = norm.flip(-1)[None]
        cls_idx = F.grid_sample(src.volume, g, mode="nearest", padding_mode="border", align_corners=True)[0, 0]
        # points outside the source are background: the border class of a map is 0 by construction
        outside = ((norm < -1) | (norm > 1)).any(-1)
        cls_idx[outside] = 0.0
        dist = None
        if src.outside_distance_mm is not None:
            dist = F.grid_sample(src.outside_distance_mm, g, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
            dist[outside] = 1e6
        return cls_idx, dist

    def _random_affine(self, rng) -> np.ndarray:
        cfg = self.cfg
        a = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
        rx = np.array([[1, 0, 0], [0, math.cos(a[0]), -math.sin(a[0])], [0, math.sin(a[0]), math.cos(a[0])]])
        ry = np.array([[math.cos(a[1]), 0, math.sin(a[1])], [0, 1, 0], [-math.sin(a[1]), 0, math.cos(a[1])]])
        rz = np.array([[math.cos(a[2]), -math.sin(a[2]), 0], [math.sin(a[2]), math.cos(a[2]), 0], [0, 0, 1]])
        scale = np.diag(rng.uniform(1 - cfg.scale, 1 + cfg.scale, 3))
        shear = np.eye(3) + np.triu(rng.uniform(-cfg.shear, cfg.shear, (3, 3)), 1)
        return rz @ ry @ rx @ shear @ scale

    def _elastic(self, rng, shape) -> torch.Tensor:
        n = self.cfg.elastic_grid
        field = torch.from_numpy(rng.normal(0, self.cfg.elastic_mm, (1, 3, n, n, n)).astype(np.float32))
        up = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0]
        return up.permute(1, 2, 3, 0)

    # ------------------------------------------------------------------ labels
    def _swap_sides(self, labels: torch.Tensor) -> torch.Tensor:
        lut = torch.arange(int(labels.max()) + 1, dtype=labels.dtype)
        for a, b in self._swap.items():
            if a < len(lut) and b < len(lut):
                lut[a] = b
        return lut[labels.long()]

    def _defined_after_flip(self, defined: set[int], flip: bool) -> set[int]:
        return {self._swap.get(l, l) for l in defined} if flip else set(defined)

    def _add_shells(self, rng, labels: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Random CSF / skull / scalp layers around a skull-stripped map."""
        csf = rng.uniform(0.5, 3.0)
        skull = csf + rng.uniform(3.0, 7.0)
        scalp = skull + rng.uniform(3.0, 9.0)
        out = labels.clone()
        bg = labels == 0
        out[bg & (dist > 0) & (dist <= csf)] = GEN_CSF
        out[bg & (dist > csf) & (dist <= skull)] = GEN_SKULL
        out[bg & (dist > skull) & (dist <= scalp)] = GEN_SCALP
        return out

    def _targets(self, labels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft one-hot at the output spacing by counting sub-voxels (cheaper than pooling a
        full-resolution one-hot); ignored voxels count in neither target nor weight."""
        n = self.tree.n_classes
        lut = torch.zeros(int(labels.max()) + 1, dtype=torch.long)
        for lab, ch in self.tree.aseg_to_channel.items():
            if lab < len(lut):
                lut[lab] = ch
        if IGNORE < len(lut):
            lut[IGNORE] = n  # an extra bin, dropped below
        ch = lut[labels.long()]
        X, Y, Z = (s // factor for s in labels.shape)
        out_idx = torch.arange(X * Y * Z).view(X, 1, Y, 1, Z, 1).expand(X, factor, Y, factor, Z, factor)
        flat = out_idx.reshape(X, factor, Y, factor, Z, factor) * (n + 1) + ch.view(X, factor, Y, factor, Z, factor)
        counts = torch.bincount(flat.reshape(-1), minlength=X * Y * Z * (n + 1)).view(X, Y, Z, n + 1)
        counts = counts.permute(3, 0, 1, 2).float() / factor**3
        return counts[:n].contiguous(), (1.0 - counts[n:])

    # ------------------------------------------------------------------ intensities
    def _paint(self, rng, labels: torch.Tensor, spacing: float) -> torch.Tensor:
        cfg = self.cfg
        uniq = torch.unique(labels).tolist()
        t1 = rng.random() < cfg.t1_prior_prob
        means: dict[int, float] = {}
        for lab in uniq:
            base = self._swap_base(lab)
            if base in means:
                means[lab] = means[base] + rng.normal(0, 0.01)
                continue
            if t1:
                m = _T1_MEANS.get(lab, rng.uniform(0, 1)) + rng.normal(0, cfg.intensity_jitter)
            else:
                m = rng.uniform(0.0, 1.0)
            means[lab] = float(np.clip(m, 0.0, 1.0))
        lut_mean = torch.zeros(int(max(uniq)) + 1)
        lut_std = torch.zeros(int(max(uniq)) + 1)
        for lab in uniq:
            lut_mean[lab] = means[lab]
            lut_std[lab] = rng.uniform(0.0, cfg.std_max)
        li = labels.long()
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = lut_mean[li] + lut_std[li] * torch.randn(labels.shape, generator=gen)
        image = self._blur(rng, image, spacing)
        image = image * self._bias(rng, image.shape)
        return image.clamp_min(0.0)

    def _swap_base(self, lab: int) -> int:
        return min(lab, self._swap.get(lab, lab))

    def _blur(self, rng, image: torch.Tensor, spacing: float) -> torch.Tensor:
        cfg = self.cfg
        sig = rng.uniform(0.0, cfg.blur_max_mm, 3)
        if rng.random() < cfg.thick_slice_prob:
            axis = int(rng.integers(3))
            sig[axis] = rng.uniform(1.0, cfg.thick_slice_max_mm) / 2.355
        out = image[None, None]
        for axis in range(3):
            s = sig[axis] / spacing
            if s < 0.3:
                continue
            r = int(math.ceil(2.5 * s))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / s) ** 2)
            k = (k / k.sum()).view([1, 1] + [(-1 if a == axis else 1) for a in range(3)])
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            out = F.conv3d(F.pad(out, pad, mode="replicate"), k)
        return out[0, 0]

    def _bias(self, rng, shape) -> torch.Tensor:
        field = torch.from_numpy(rng.normal(0, self.cfg.bias_std, (1, 1, 4, 4, 4)).astype(np.float32))
        return torch.exp(F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0])

    def _corrupt_after(self, rng, image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        image = image / image.max().clamp_min(1e-6)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + torch.randn(image.shape, generator=gen) * rng.uniform(0, cfg.noise_max)
        image = image.clamp_min(0.0) ** float(np.exp(rng.normal(0, cfg.gamma_std)))
        return image

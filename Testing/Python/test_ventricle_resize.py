"""Ventricle size augmentation: ventricles grow into the tissue that lines them and nothing else,
shrink back into it, keep the brain outline, and an unused option leaves the random stream alone."""
import numpy as np
import pytest
import torch

from msdseg.training.synth import LabelSource, SynthConfig, SyntheticGenerator, resize_ventricles
from shared import TREE

pytestmark = pytest.mark.unit


def _map() -> torch.Tensor:
    """A 1 mm block: cortex shell (3) around white matter (2), a caudate (11) next to a lateral
    ventricle (4), and a putamen (12) touching the ventricle (putamen never gives way)."""
    lab = torch.zeros((40, 40, 40), dtype=torch.int64)
    lab[4:36, 4:36, 4:36] = 3
    lab[7:33, 7:33, 7:33] = 2
    lab[15:25, 15:25, 15:25] = 4
    lab[25:29, 15:25, 15:25] = 11
    lab[15:25, 11:15, 15:25] = 12
    return lab


def _count(lab: torch.Tensor, value: int) -> int:
    return int((lab == value).sum())


def test_growth_takes_white_matter_and_caudate_but_not_cortex_putamen_or_background():
    lab = _map()
    grown = resize_ventricles(lab, 2.0, 1.0, np.random.default_rng(0))
    # two face-connected layers around a 10^3 cube on the free faces
    assert _count(grown, 4) > _count(lab, 4) + 4 * 100
    assert _count(grown, 11) < _count(lab, 11) and _count(grown, 2) < _count(lab, 2)
    assert _count(grown, 12) == _count(lab, 12) and _count(grown, 3) == _count(lab, 3)
    assert torch.equal(grown == 0, lab == 0)  # the brain outline never moves
    changed = grown != lab
    assert set(torch.unique(lab[changed]).tolist()) <= {2, 11}
    assert set(torch.unique(grown[changed]).tolist()) == {4}
    assert _count(lab, 4) == 1000  # the input is not modified


def test_shrinking_hands_the_rim_to_neighbouring_tissue_and_half_a_voxel_changes_nothing():
    lab = _map()
    shrunk = resize_ventricles(lab, -1.0, 1.0, np.random.default_rng(1))
    assert 0 < _count(shrunk, 4) < _count(lab, 4)
    changed = shrunk != lab
    assert set(torch.unique(lab[changed]).tolist()) == {4}
    assert set(torch.unique(shrunk[changed]).tolist()) <= {2, 11}  # never putamen or cortex
    assert torch.equal(resize_ventricles(lab, 0.4, 1.0, np.random.default_rng(2)), lab)
    # on a 2 mm generation grid 1.5 mm is one layer, as 1 mm is at 1 mm
    assert _count(resize_ventricles(lab, 1.5, 2.0, np.random.default_rng(3)), 4) > 1000


def test_map_without_ventricles_is_returned_unchanged():
    lab = _map()
    lab[lab == 4] = 2
    assert torch.equal(resize_ventricles(lab, 3.0, 1.0, np.random.default_rng(0)), lab)


def _toy_source() -> LabelSource:
    lab = _map().numpy().astype(np.int32)
    lab[15:25, 15:25, 15:20] = 43  # both sides, so flips are exercised
    lab[lab == 2] = np.where(np.arange(40)[:, None, None] >= 20, 41, 2).repeat(40, 1).repeat(40, 2)[lab == 2]
    aff = np.eye(4)
    aff[:3, 3] = -20.0
    return LabelSource.from_array("toy", lab, aff)


def test_generator_applies_it_only_when_asked_and_keeps_older_streams():
    src = _toy_source()
    plain = SyntheticGenerator([src], TREE)
    off = SyntheticGenerator([src], TREE, SynthConfig(ventricle_change_prob=0.0))
    a = plain.sample(np.random.default_rng(4), 2.0)
    b = off.sample(np.random.default_rng(4), 2.0)
    assert torch.equal(a.target, b.target) and torch.equal(a.image, b.image)
    always = SyntheticGenerator([src], TREE, SynthConfig(ventricle_change_prob=1.0, ventricle_change_mm=(3.0, 3.0),
                                                         elastic_mm=0.0, rotation_deg=0.0, scale=0.0, shear=0.0))
    still = SyntheticGenerator([src], TREE, SynthConfig(elastic_mm=0.0, rotation_deg=0.0, scale=0.0, shear=0.0))
    vents = [TREE.aseg_to_channel[4], TREE.aseg_to_channel[43]]
    grown = always.sample(np.random.default_rng(5), 2.0).target[vents].sum()
    base = still.sample(np.random.default_rng(5), 2.0).target[vents].sum()
    assert float(grown) > 1.3 * float(base)


def _map_with_horn() -> torch.Tensor:
    """:func:`_map` plus a thin temporal horn (5, two voxels thick) running from the ventricle
    into a hippocampus (17), as the real horn runs from the atrium into the temporal lobe."""
    lab = _map()
    lab[15:25, 25:33, 15:25] = 17
    lab[19:21, 25:31, 19:21] = 5
    return lab


def test_horn_scale_changes_the_temporal_horns_by_that_share_only():
    lab = _map_with_horn()
    full = resize_ventricles(lab, 2.0, 1.0, np.random.default_rng(0))
    half = resize_ventricles(lab, 2.0, 1.0, np.random.default_rng(0), horn_scale=0.5)
    none = resize_ventricles(lab, 2.0, 1.0, np.random.default_rng(0), horn_scale=0.0)
    horn = _count(lab, 5)
    assert horn < _count(half, 5) < _count(full, 5)
    assert _count(none, 5) == horn  # the horn keeps its size ...
    assert _count(none, 4) > _count(lab, 4) + 4 * 100  # ... while the ventricle body grows
    # what the horn takes is the tissue that lines it, never the other labels
    changed = (half != lab) & (half == 5)
    assert set(torch.unique(lab[changed]).tolist()) <= {2, 17}
    # shrinking: a horn changed by 0 stays whole, a full-share horn of two voxels all but vanishes
    assert _count(resize_ventricles(lab, -1.0, 1.0, np.random.default_rng(1), horn_scale=0.0), 5) == horn
    assert _count(resize_ventricles(lab, -1.0, 1.0, np.random.default_rng(1)), 5) < horn // 2
    # a share of one is the single pass of earlier runs, voxel for voxel
    assert torch.equal(resize_ventricles(lab, 2.0, 1.0, np.random.default_rng(0), horn_scale=1.0), full)


def test_a_fractional_horn_layer_covers_part_of_the_surface():
    lab = _map_with_horn()
    quarter = [_count(resize_ventricles(lab, 1.0, 1.0, np.random.default_rng(s), horn_scale=0.25), 5)
               for s in range(4)]
    whole = _count(resize_ventricles(lab, 1.0, 1.0, np.random.default_rng(0), horn_scale=1.0), 5)
    assert all(_count(lab, 5) <= q < whole for q in quarter)
    assert max(quarter) > _count(lab, 5)

"""Deep grey nucleus size augmentation: nuclei grow into their own side's white matter and shrink
back into it, nothing else moves, fractional layers change part of the surface, and an unused
option leaves the random stream alone."""
import numpy as np
import pytest
import torch

from msdseg.training.synth import NUCLEI, LabelSource, SynthConfig, SyntheticGenerator, resize_nuclei
from shared import TREE

pytestmark = pytest.mark.unit

LEFT_THALAMUS, RIGHT_THALAMUS, LEFT_CAUDATE, LEFT_PUTAMEN = 10, 49, 11, 12


def _map() -> torch.Tensor:
    """A 1 mm block split at x = 20 into a left (2) and right (41) white matter, with a thalamus on
    each side touching the midline, a left caudate next to a lateral ventricle (4) and a left
    putamen inside a cortex (3) pocket."""
    lab = torch.zeros((40, 40, 40), dtype=torch.int64)
    lab[2:38, 2:38, 2:38] = 3
    lab[4:20, 4:36, 4:36] = 2
    lab[20:36, 4:36, 4:36] = 41
    lab[12:20, 14:24, 14:24] = LEFT_THALAMUS
    lab[20:28, 14:24, 14:24] = RIGHT_THALAMUS
    lab[8:12, 26:32, 14:24] = LEFT_CAUDATE
    lab[8:12, 32:36, 14:24] = 4
    lab[4:8, 4:10, 4:10] = LEFT_PUTAMEN
    return lab


def _count(lab: torch.Tensor, value: int) -> int:
    return int((lab == value).sum())


def test_growth_takes_only_own_side_white_matter():
    lab = _map()
    grown = resize_nuclei(lab, {LEFT_THALAMUS: 2.0, LEFT_CAUDATE: 1.0}, 1.0, np.random.default_rng(0))
    assert _count(grown, LEFT_THALAMUS) > _count(lab, LEFT_THALAMUS) + 2 * 8 * 10
    assert _count(grown, RIGHT_THALAMUS) > _count(lab, RIGHT_THALAMUS)  # pairs change together
    assert _count(grown, LEFT_CAUDATE) > _count(lab, LEFT_CAUDATE)
    changed = grown != lab
    was, now = lab[changed], grown[changed]
    # left nuclei only ever take left white matter, right ones right white matter
    assert set(was[torch.isin(now, torch.tensor([LEFT_THALAMUS, LEFT_CAUDATE]))].tolist()) == {2}
    assert set(was[now == RIGHT_THALAMUS].tolist()) == {41}
    for fixed in (0, 3, 4, LEFT_PUTAMEN):  # background, cortex, ventricle, an unchosen pair
        assert torch.equal(grown == fixed, lab == fixed)
    assert _count(lab, LEFT_THALAMUS) == 8 * 10 * 10  # the input is not modified


def test_shrinking_hands_the_rim_to_white_matter_and_fractions_change_part_of_it():
    lab = _map()
    shrunk = resize_nuclei(lab, {LEFT_THALAMUS: -1.0}, 1.0, np.random.default_rng(1))
    assert 0 < _count(shrunk, LEFT_THALAMUS) < _count(lab, LEFT_THALAMUS)
    changed = shrunk != lab
    assert set(lab[changed].tolist()) == {LEFT_THALAMUS, RIGHT_THALAMUS}
    assert set(shrunk[changed & (lab == LEFT_THALAMUS)].tolist()) == {2}
    assert set(shrunk[changed & (lab == RIGHT_THALAMUS)].tolist()) == {41}
    # where a thalamus touches only the other thalamus (the midline face) nothing happens
    assert torch.equal(shrunk[19:21, 15:23, 15:23], lab[19:21, 15:23, 15:23])
    whole = _count(lab, LEFT_THALAMUS) - _count(resize_nuclei(lab, {LEFT_THALAMUS: -1.0}, 1.0, np.random.default_rng(2)), LEFT_THALAMUS)
    half = _count(lab, LEFT_THALAMUS) - _count(resize_nuclei(lab, {LEFT_THALAMUS: -0.5}, 1.0, np.random.default_rng(2)), LEFT_THALAMUS)
    assert 0 < half < whole
    assert torch.equal(resize_nuclei(lab, {}, 1.0, np.random.default_rng(3)), lab)
    assert torch.equal(resize_nuclei(lab, {LEFT_THALAMUS: 0.0}, 1.0, np.random.default_rng(3)), lab)


def test_maps_without_the_nuclei_or_white_matter():
    lab = _map()
    no_nuclei = torch.where(torch.isin(lab, torch.tensor([l for pair in NUCLEI for l in pair])), 2, lab)
    assert torch.equal(resize_nuclei(no_nuclei, {LEFT_THALAMUS: 2.0}, 1.0, np.random.default_rng(0)), no_nuclei)
    # a partial map's unlabelled brain stands in for white matter
    from msdseg.training.synth import GEN_UNLABELLED_BRAIN
    partial = torch.where((lab == 2) | (lab == 41), GEN_UNLABELLED_BRAIN, lab)
    grown = resize_nuclei(partial, {LEFT_THALAMUS: 1.0}, 1.0, np.random.default_rng(0))
    assert _count(grown, LEFT_THALAMUS) > _count(partial, LEFT_THALAMUS)


def _toy_source() -> LabelSource:
    aff = np.eye(4)
    aff[:3, 3] = -20.0
    return LabelSource.from_array("toy", _map().numpy().astype(np.int32), aff)


@pytest.mark.slow
def test_generator_applies_it_only_when_asked_and_keeps_older_streams():
    src = _toy_source()
    still = dict(elastic_mm=0.0, rotation_deg=0.0, scale=0.0, shear=0.0, flip_prob=0.0)
    a = SyntheticGenerator([src], TREE, SynthConfig(**still)).sample(np.random.default_rng(4), 2.0)
    b = SyntheticGenerator([src], TREE, SynthConfig(nuclei_change_prob=0.0, **still)).sample(np.random.default_rng(4), 2.0)
    assert torch.equal(a.target, b.target) and torch.equal(a.image, b.image)
    shrink = SyntheticGenerator([src], TREE, SynthConfig(nuclei_change_prob=1.0, nuclei_change_mm=(-2.0, -2.0), **still))
    thal = [TREE.aseg_to_channel[LEFT_THALAMUS], TREE.aseg_to_channel[RIGHT_THALAMUS]]
    smaller = shrink.sample(np.random.default_rng(5), 2.0).target[thal].sum()
    base = SyntheticGenerator([src], TREE, SynthConfig(**still)).sample(np.random.default_rng(5), 2.0).target[thal].sum()
    assert float(smaller) < 0.8 * float(base)

"""Synthetic generator and hierarchical loss: flips swap sides, targets are proper soft labels,
undefined structures neither help nor hurt, and the same conventions hold at every depth."""
import numpy as np
import pytest
import torch

from msdseg.training.losses import HierarchicalLoss
from msdseg.training.synth import IGNORE, LabelSource, SynthConfig, SyntheticGenerator
from shared import TREE

pytestmark = pytest.mark.unit


def _toy_map(with_wm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm RAS map: left (x<0) half-brain labelled 3/2, right half 42/41, a midline brainstem."""
    shape = (80, 90, 70)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    brain = (x / 35) ** 2 + (y / 40) ** 2 + (z / 30) ** 2 < 1
    inner = (x / 25) ** 2 + (y / 30) ** 2 + (z / 20) ** 2 < 1
    lab = np.zeros(shape, np.int32)
    lab[brain & (x < 0)] = 3
    lab[brain & (x >= 0)] = 42
    if with_wm:
        lab[inner & (x < 0)] = 2
        lab[inner & (x >= 0)] = 41
    else:
        lab[inner] = 0
    lab[(np.abs(x) < 3) & (np.abs(y) < 5) & (z < -5) & brain] = 16
    lab[(np.abs(x - 10) < 2) & (np.abs(y) < 2) & (np.abs(z) < 2)] = IGNORE
    aff = np.eye(4)
    aff[:3, 3] = -np.array(shape) / 2
    return lab, aff


@pytest.fixture(scope="module")
def generator() -> SyntheticGenerator:
    lab, aff = _toy_map()
    return SyntheticGenerator([LabelSource.from_array("toy", lab, aff)], TREE)


def _side_of(sample, label: int) -> float:
    """Mean RAS x (from the coordinate channels) of voxels whose target is mostly ``label``."""
    ch = TREE.aseg_to_channel[label]
    mask = sample.target[ch] > 0.5
    return float(sample.coords[0][mask].mean())


def test_flip_mirrors_anatomy_and_swaps_labels(generator):
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(12):
        s = generator.sample(rng, 4.0)
        seen.add(s.flipped)
        # whatever the flip, label 3 (left cortex) must lie on the left (RAS x < 0) and 42 on the right
        assert _side_of(s, 3) < 0 < _side_of(s, 42)
    assert seen == {True, False}


def test_targets_are_soft_labels_and_ignored_voxels_have_zero_weight(generator):
    s = generator.sample(np.random.default_rng(0), 2.0, crop_shape=(32, 32, 32))
    total = s.target.sum(0)
    assert torch.allclose(total + (1 - s.weight[0]), torch.ones_like(total), atol=1e-5)
    assert s.target.min() >= 0 and s.image.shape == (1, 32, 32, 32)
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.5


def test_partial_map_masks_undefined_structures():
    lab, aff = _toy_map(with_wm=False)
    gen = SyntheticGenerator([LabelSource.from_array("partial", lab, aff)], TREE)
    s = gen.sample(np.random.default_rng(1), 4.0)
    ch = TREE.aseg_to_channel
    assert s.channel_mask[ch[3]] and not s.channel_mask[ch[2]] and not s.channel_mask[0]
    assert not s.internal_mask.any()  # no internal node is complete without white matter


def test_merged_group_follows_its_side_through_flips():
    """A map that merges only its left cortex and WM: the sample's merged channels are the left
    pair, or the right pair when the generator mirrored the map (labels and sides swap together)."""
    lab, aff = _toy_map()
    src = LabelSource.from_array("merged", lab, aff, {2, 3, 41, 42, 16}, merged_labels=[(2, 3)])
    src.defined_labels -= {2, 3}
    gen = SyntheticGenerator([src], TREE)
    ch = TREE.aseg_to_channel
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(12):  # this seed mirrors the first eight draws, then not
        s = gen.sample(rng, 4.0)
        seen.add(s.flipped)
        pair = [ch[41], ch[42]] if s.flipped else [ch[2], ch[3]]
        assert sorted(np.flatnonzero(s.merged_mask.numpy()).tolist()) == sorted(pair)
        assert not s.channel_mask[pair].any()
    assert seen == {True, False}


def test_loss_ignores_undefined_channels_and_rewards_the_truth():
    loss = HierarchicalLoss(TREE)
    rng = torch.Generator().manual_seed(0)
    n = TREE.n_classes
    idx = torch.randint(0, n, (1, 8, 8, 8), generator=rng)
    target = torch.nn.functional.one_hot(idx, n).permute(0, 4, 1, 2, 3).float()
    weight = torch.ones(1, 1, 8, 8, 8)
    good = [target * 20.0]
    bad = [torch.randn(1, n, 8, 8, 8, generator=rng)]
    full_c, full_i = torch.ones(1, n, dtype=torch.bool), torch.ones(1, len(TREE.internal), dtype=torch.bool)
    lg, _ = loss(good, target, weight, full_c, full_i)
    lb, _ = loss(bad, target, weight, full_c, full_i)
    assert lg < 0.2 * lb
    # what a map says about a structure it does not define (here: garbage) changes nothing
    mask = full_c.clone()
    mask[0, 5] = False
    part_i = torch.zeros_like(full_i)
    garbage = target.clone()
    garbage[:, 5] = (torch.rand(1, 8, 8, 8, generator=rng) > 0.5).float()
    l1, _ = loss(good, target, weight, mask, part_i)
    l2, _ = loss(good, garbage, weight, mask, part_i)
    assert float(l1) == pytest.approx(float(l2), abs=1e-7)
    l3, _ = loss(good, garbage, weight, full_c, part_i)
    assert float(l3) > float(l1) + 0.01  # ... whereas a defined channel is supervised


def test_loss_gradient_survives_saturated_background():
    """A network stuck at 'background everywhere' must still get a push towards the structures."""
    loss = HierarchicalLoss(TREE)
    n = TREE.n_classes
    target = torch.zeros(1, n, 4, 4, 4)
    target[:, 0] = 1
    target[:, 0, :2] = 0
    target[:, TREE.aseg_to_channel[10], :2] = 1
    logits = torch.full((1, n, 4, 4, 4), -60.0)
    logits[:, 0] = 60.0
    logits.requires_grad_(True)
    l, _ = loss([logits], target, torch.ones(1, 1, 4, 4, 4), torch.ones(1, n, dtype=torch.bool),
                torch.ones(1, len(TREE.internal), dtype=torch.bool))
    l.backward()
    # with log(clamp(p)) this gradient is exactly zero; through log_softmax it is not
    assert logits.grad[:, TREE.aseg_to_channel[10], :2].max() < -1e-5


def test_cut_field_of_view_blanks_image_and_supervision_together():
    lab, aff = _toy_map()
    gen = SyntheticGenerator([LabelSource.from_array("toy", lab, aff)], TREE, SynthConfig(fov_prob=1.0, fov_cut_max=0.3))
    rng = np.random.default_rng(5)
    for _ in range(4):
        s = gen.sample(rng, 4.0)
        cut = s.weight[0] == 0
        brain = s.target[1:].sum(0) > 0.5
        assert (cut & brain).sum() > 0  # each cut removes part of the brain ...
        assert (~cut & brain).sum() > 2 * (cut & brain).sum()  # ... but at most about a third
        assert float(s.image[0][cut].abs().max()) == 0.0  # nothing acquired there
        assert float(s.image[0][~cut].max()) > 0.5


def test_emphasis_weights_the_named_structures_on_both_sides_and_nothing_else():
    from msdseg.training.losses import leaf_weight_vector

    w = leaf_weight_vector(TREE, {"hippocampus": 2.0, "left_amygdala": 3.0})
    ch = TREE.leaf_channel
    assert w[ch["left_hippocampus"]] == w[ch["right_hippocampus"]] == 2.0
    assert w[ch["left_amygdala"]] == 3.0 and w[ch["right_amygdala"]] == 1.0
    assert (np.delete(w, [ch["left_hippocampus"], ch["right_hippocampus"], ch["left_amygdala"]]) == 1.0).all()
    with pytest.raises(ValueError, match="no such structure"):
        leaf_weight_vector(TREE, {"hipocampus": 2.0})


def test_emphasised_structure_costs_more_when_it_is_wrong():
    """The same mistake on an emphasised leaf raises the loss more than on an ordinary one, and an
    emphasis of 1 everywhere is exactly the plain loss."""
    from msdseg.training.losses import leaf_weight_vector

    n = TREE.n_classes
    rng = torch.Generator().manual_seed(1)
    idx = torch.randint(0, n, (1, 8, 8, 8), generator=rng)
    target = torch.nn.functional.one_hot(idx, n).permute(0, 4, 1, 2, 3).float()
    weight = torch.ones(1, 1, 8, 8, 8)
    full_c, full_i = torch.ones(1, n, dtype=torch.bool), torch.ones(1, len(TREE.internal), dtype=torch.bool)
    hip, other = TREE.leaf_channel["left_hippocampus"], TREE.leaf_channel["left_putamen"]

    def wrong_on(channel):
        logits = target * 20.0
        logits[:, channel] = -20.0  # this structure is never predicted
        return [logits]

    plain = HierarchicalLoss(TREE)
    ones = HierarchicalLoss(TREE, leaf_weights=leaf_weight_vector(TREE, {}))
    emph = HierarchicalLoss(TREE, leaf_weights=leaf_weight_vector(TREE, {"hippocampus": 3.0}))
    for ch in (hip, other):
        assert float(ones(wrong_on(ch), target, weight, full_c, full_i)[0]) == pytest.approx(
            float(plain(wrong_on(ch), target, weight, full_c, full_i)[0]), rel=1e-6)
    assert float(emph(wrong_on(hip), target, weight, full_c, full_i)[0]) > \
        1.5 * float(emph(wrong_on(other), target, weight, full_c, full_i)[0])


def test_focus_crops_hold_the_focus_structure_and_off_keeps_the_random_stream():
    lab, aff = _toy_map()
    x, y, z = np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij")
    lab[(x - 62) ** 2 + (y - 35) ** 2 + (z - 30) ** 2 < 16] = 53  # a small lateral "hippocampus"
    src = [LabelSource.from_array("toy", lab, aff)]
    hip = TREE.aseg_to_channel[53]
    plain = SyntheticGenerator(src, TREE, SynthConfig(flip_prob=0.0))
    off = SyntheticGenerator(src, TREE, SynthConfig(flip_prob=0.0, focus_prob=0.0, focus_labels=(53,)))
    on = SyntheticGenerator(src, TREE, SynthConfig(flip_prob=0.0, focus_prob=1.0, focus_labels=(53,)))
    a = plain.sample(np.random.default_rng(5), 1.0, (32, 32, 32))
    b = off.sample(np.random.default_rng(5), 1.0, (32, 32, 32))
    assert torch.equal(a.image, b.image)
    rng = np.random.default_rng(0)
    with_focus = [float(on.sample(rng, 1.0, (32, 32, 32)).target[hip].sum()) for _ in range(6)]
    rng = np.random.default_rng(0)
    without = [float(plain.sample(rng, 1.0, (32, 32, 32)).target[hip].sum()) for _ in range(6)]
    assert min(with_focus) > 0
    assert sum(v > 0 for v in without) < 6

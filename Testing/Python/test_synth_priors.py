"""Label maps drawn from atlas priors: faithful where the atlas is certain, varied where it is not,
on the right grid, and usable by the synthetic generator like any other label source."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msdseg.training.synth import SyntheticGenerator
from msdseg.training.priors import PriorMapSampler, PriorSampleConfig, sample_label_map

pytestmark = pytest.mark.unit

LABELS = np.array([0, 3, 42, 1165], np.int32)


def _toy_priors(shape=(24, 28, 22)) -> np.ndarray:
    """Left (3) / right (42) cortex inside a skull shell (1165), soft borders of a few voxels."""
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt((x / 9) ** 2 + (y / 11) ** 2 + (z / 8) ** 2)
    inside = 1 / (1 + np.exp((r - 1.0) * 12))
    shell = np.clip(1 / (1 + np.exp((r - 1.25) * 12)) - inside, 0, 1)
    left = 1 / (1 + np.exp(x * 1.5))
    p = np.stack([np.zeros(shape), inside * left, inside * (1 - left), shell])
    p[0] = np.clip(1 - p[1:].sum(0), 0, 1)
    return (p / p.sum(0, keepdims=True)).astype(np.float16)


def _write(tmp_path, priors):
    aff2 = np.diag([2.0, 2.0, 2.0, 1.0])
    aff2[:3, 3] = -np.array(priors.shape[1:]) + 0.5  # 2 mm voxel centres = centres of 2x2x2 blocks
    aff1 = np.eye(4)
    aff1[:3, 3] = aff2[:3, 3] - 0.5
    path = tmp_path / "priors.npz"
    np.savez(path, priors=priors, labels=LABELS, affine=aff2, affine_1mm=aff1)
    return path


def test_without_noise_the_sample_is_the_argmax_of_the_upsampled_priors():
    priors = _toy_priors()
    cfg = PriorSampleConfig(temperature=(1.0, 1.0), noise_std=(0.0, 0.0))
    out = sample_label_map(priors, LABELS, np.random.default_rng(0), cfg)
    assert out.shape == tuple(2 * s for s in priors.shape[1:])
    up = F.interpolate(torch.log(torch.from_numpy(priors.astype(np.float32)) + 1e-4)[None], scale_factor=2,
                       mode="trilinear", align_corners=False)[0]
    np.testing.assert_array_equal(out, LABELS[up.argmax(0).numpy()])


def test_noise_moves_uncertain_borders_but_keeps_certain_voxels_and_sides():
    priors = _toy_priors()
    certain = np.repeat(np.repeat(np.repeat(priors.max(0) > 0.999, 2, 0), 2, 1), 2, 2)
    certain_label = np.repeat(np.repeat(np.repeat(LABELS[priors.argmax(0)], 2, 0), 2, 1), 2, 2)
    rng = np.random.default_rng(1)
    a = sample_label_map(priors, LABELS, rng)
    b = sample_label_map(priors, LABELS, rng)
    assert (a != b).mean() > 0.002  # two draws differ...
    np.testing.assert_array_equal(a[certain], certain_label[certain])  # ...but not where the atlas is sure
    xs = np.arange(a.shape[0])[:, None, None] * np.ones(a.shape)
    assert xs[a == 3].mean() < a.shape[0] / 2 < xs[a == 42].mean()  # left stays left


def test_sampler_reuses_maps_and_feeds_the_generator(tmp_path, tree):
    path = _write(tmp_path, _toy_priors())
    sampler = PriorMapSampler(path, cfg=PriorSampleConfig(reuse=2))
    assert sampler.defined_labels == {3, 42}
    rng = np.random.default_rng(0)
    first, second, third = (sampler.label_source(rng) for _ in range(3))
    assert first is second and third is not first
    assert 1165 in first.classes and first.has_nonbrain  # head tissue comes from the atlas, no shells
    sample = SyntheticGenerator([sampler], tree).sample(rng, 4.0)
    assert sample.source == sampler.name
    ch = [tree.aseg_to_channel[3], tree.aseg_to_channel[42]]
    assert sample.target[ch].sum() > 10
    assert bool(sample.channel_mask[ch].all())

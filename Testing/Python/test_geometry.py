"""Geometry: model grid placement, left stays left, exact round trip to the input grid."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings, strategies as st

from conftest import make_image, phantom_fn, rotation
from msdseg.inference.backproject import backproject
from msdseg.core.geometry import ModelGrid, head_grid, image_on_grid, input_index_to_grid_index
from msdseg.core.io import image_from_ras_affine, ras_affine

pytestmark = pytest.mark.unit


def side_probs(grid: ModelGrid) -> torch.Tensor:
    """Two-class 'probabilities' on the grid: class 1 where RAS x < 0 (the LEFT side)."""
    ras = grid.coordinates(np.zeros(3)) * 100.0
    left = (ras[0] < 0).astype(np.float32)
    return torch.from_numpy(np.stack([1 - left, left]))


@settings(max_examples=25, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    flips=st.tuples(*[st.sampled_from([-1, 1])] * 3),
    spacing=st.tuples(*[st.floats(0.7, 4.0)] * 3),
    perm=st.permutations([0, 1, 2]),
)
def test_backprojection_is_exact_on_any_input_grid(angles, flips, spacing, perm):
    direction = (rotation(*angles) @ np.diag(flips))[:, list(perm)]
    img = make_image((23, 19, 17), spacing, direction, (3.0, -4.0, 5.0))
    grid = ModelGrid.centred(np.zeros(3), 2.0)
    labels, _ = backproject(side_probs(grid), grid, img, np.array([0, 7]))
    # geometry identical to the input
    assert labels.GetSize() == img.GetSize()
    assert np.allclose(labels.GetSpacing(), img.GetSpacing())
    assert np.allclose(labels.GetOrigin(), img.GetOrigin())
    assert np.allclose(labels.GetDirection(), img.GetDirection())
    # every voxel clearly on the left (RAS x < -2 mm, i.e. LPS x > 2) is labelled 7, the right 0
    aff = ras_affine(img)
    arr = np.transpose(sitk.GetArrayFromImage(labels), (2, 1, 0))
    idx = np.argwhere(np.ones(arr.shape, bool))
    ras = idx @ aff[:3, :3].T + aff[:3, 3]
    vals = arr[tuple(idx.T)]
    assert np.all(vals[ras[:, 0] < -2.0] == 7)
    assert np.all(vals[ras[:, 0] > 2.0] == 0)


@settings(max_examples=10, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-0.5, 0.5)] * 3),
    flips=st.tuples(*[st.sampled_from([-1, 1])] * 3),
    perm=st.permutations([0, 1, 2]),
)
def test_left_blob_lands_on_the_left_of_the_model_grid(angles, flips, perm):
    direction = (rotation(*angles) @ np.diag(flips))[:, list(perm)]
    img = make_image((60, 70, 60), (3.0, 3.0, 3.0), direction, (0.0, 0.0, 0.0), phantom_fn)
    grid = head_grid(img, 4.0)
    vals = image_on_grid(img, grid)
    blob = vals > 0.8 * vals.max()
    x_of_blob = np.argwhere(blob)[:, 0].mean()
    assert x_of_blob < grid.shape[0] / 2 - 2, "the left-hemisphere blob must be at low RAS x (left)"


def test_grid_index_affine_matches_physical_points():
    img = make_image((10, 11, 12), (1.2, 0.9, 3.0), rotation(0.2, 0.1, -0.4), (10, 20, 30))
    grid = ModelGrid.centred(np.array([-10.0, -20.0, 30.0]), 2.0)
    mat = input_index_to_grid_index(img, grid)
    for ijk in [(0, 0, 0), (9, 10, 11), (3, 7, 2)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = lps * np.array([-1, -1, 1])
        expected = (ras - np.array(grid.origin_ras)) / grid.spacing_mm
        np.testing.assert_allclose(mat[:3, :3] @ np.array(ijk) + mat[:3, 3], expected, atol=1e-9)


def test_depth_grids_share_field_of_view_and_pool_exactly():
    fine = ModelGrid.centred(np.array([1.0, 2.0, 3.0]), 1.0)
    coarse = fine.at_spacing(2.0)
    assert coarse.shape == tuple(s // 2 for s in fine.shape)
    # centre of the first 2x2x2 block of the fine grid == first voxel of the coarse grid
    np.testing.assert_allclose(np.array(fine.origin_ras) + 0.5, coarse.origin_ras)


def test_head_grid_hangs_from_the_top_for_a_long_scan():
    # 300 mm tall foreground (head + neck): the grid's top must be near the top of the head
    img = make_image((40, 40, 100), (5.0, 5.0, 3.0), np.eye(3), (0, 0, 0),
                     lambda p: 100.0 * ((p[..., 0] / 70) ** 2 + (p[..., 1] / 80) ** 2 < 1))
    grid = head_grid(img, 2.0)
    top = grid.origin_ras[2] + grid.spacing_mm * (grid.shape[2] - 1)
    assert 145.0 < top < 165.0  # scan top is at +148.5 mm, grid adds an 8 mm margin


def test_mgz_style_affine_round_trip():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    aff = np.array([[-1.0, 0, 0, 10], [0, 0, 1.5, -20], [0, -2.0, 0, 30], [0, 0, 0, 1]])
    img = image_from_ras_affine(data, aff)
    np.testing.assert_allclose(ras_affine(img), aff, atol=1e-9)
    assert sitk.GetArrayFromImage(img)[5, 4, 3] == data[3, 4, 5]


def test_big_endian_float_mgz_is_read(tmp_path):
    import nibabel as nib

    from msdseg.core.io import read_image

    data = (np.arange(20 * 21 * 22, dtype=">f4").reshape(20, 21, 22) % 97) * 3.0
    aff = np.diag([-4.0, 4.0, 4.0, 1.0])
    nib.save(nib.MGHImage(data, aff), str(tmp_path / "vol.mgz"))
    img = read_image(tmp_path / "vol.mgz")
    np.testing.assert_allclose(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), data)
    np.testing.assert_allclose(ras_affine(img), aff, atol=1e-6)


def _labels_by_brute_force(
    probs: np.ndarray, grid: ModelGrid, img: sitk.Image, lut: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every input voxel mapped to the grid and interpolated channel by channel (scipy), no boxes;
    and where that is decidable (not within 1e-3 voxels of the grid's edge, where float32 and
    float64 may disagree on inside / outside)."""
    from scipy.ndimage import map_coordinates

    size = img.GetSize()
    idx = np.argwhere(np.ones(size, bool)).astype(float)  # (i, j, k)
    mat = input_index_to_grid_index(img, grid)
    g = idx @ mat[:3, :3].T + mat[:3, 3]
    inside = np.all((g >= 0) & (g <= np.array(grid.shape) - 1), axis=1)
    p = np.stack([map_coordinates(c, g.T, order=1, mode="constant") for c in probs])
    lab = np.where(inside, lut[p.argmax(0)], 0)
    edge = np.any(np.minimum(np.abs(g), np.abs(g - (np.array(grid.shape) - 1))) < 1e-3, axis=1)
    out = np.zeros(size[::-1], np.uint16)
    decidable = np.ones(size[::-1], bool)
    where = (idx[:, 2].astype(int), idx[:, 1].astype(int), idx[:, 0].astype(int))
    out[where] = lab
    decidable[where] = ~edge
    return out, decidable


@settings(max_examples=15, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    spacing=st.tuples(*[st.floats(1.0, 3.0)] * 3),
    offset=st.tuples(*[st.floats(-4.0, 4.0)] * 3),
    seed=st.integers(0, 2**16),
)
def test_backprojection_samples_only_where_a_label_can_land(angles, spacing, offset, seed):
    """The label-only path samples a box around the foreground; it must give exactly the labels of
    interpolating every input voxel (background by convexity outside the box)."""
    rng = np.random.default_rng(seed)
    img = make_image((41, 37, 33), spacing, rotation(*angles), offset)
    grid = ModelGrid((-24.0, -20.0, -16.0), 4.0, (12, 10, 8))
    logits = rng.normal(size=(3, *grid.shape)).astype(np.float32)
    logits[0] += 3.0  # mostly background ...
    logits[1:, 4:8, 3:6, 2:5] += 5.0  # ... around a small foreground block
    probs = torch.softmax(torch.from_numpy(logits), 0)
    lut = np.array([0, 7, 9])
    labels, _ = backproject(probs, grid, img, lut)
    expected, decidable = _labels_by_brute_force(probs.numpy(), grid, img, lut)
    got = sitk.GetArrayFromImage(labels)
    assert expected.any(), "the foreground block must reach the input"
    assert np.array_equal(got[decidable], expected[decidable])
    # the uncertainty path samples the whole grid box: the same labels, voxel for voxel
    with_unc, unc = backproject(probs, grid, img, lut, uncertainty=probs[:1])
    assert np.array_equal(sitk.GetArrayFromImage(with_unc), got)
    assert unc is not None


def test_backprojection_of_an_all_background_grid_is_background():
    img = make_image((9, 8, 7), (2.0, 2.0, 2.0), np.eye(3), (0.0, 0.0, 0.0))
    grid = ModelGrid((-8.0, -8.0, -8.0), 4.0, (4, 4, 4))
    probs = torch.zeros(2, 4, 4, 4)
    probs[0] = 1.0
    labels, _ = backproject(probs, grid, img, np.array([0, 5]))
    assert labels.GetSize() == img.GetSize()
    assert not sitk.GetArrayFromImage(labels).any()

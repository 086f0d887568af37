"""Answers on a finer grid than a thick-slice input's own (``--output-spacing``)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn, rotation
from msdseg.core.geometry import finer_output_grid


def _box_corners(image: sitk.Image) -> np.ndarray:
    """Physical positions of the outer corners of the voxel box (not of the corner voxels' centres)."""
    size = np.asarray(image.GetSize(), float)
    corners = [[a, b, c] for a in (-0.5, size[0] - 0.5) for b in (-0.5, size[1] - 0.5) for c in (-0.5, size[2] - 0.5)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(list(map(float, c))) for c in corners])


@pytest.mark.unit
def test_a_thick_slice_grid_becomes_fine_over_the_same_box():
    direction = rotation(0.2, 0.0, -0.3)
    thick = make_image((40, 44, 9), (1.0, 1.0, 5.0), direction, (3.0, -4.0, 10.0), phantom_fn)
    fine = finer_output_grid(thick, 1.0)
    assert fine.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert fine.GetSize() == (40, 44, 45)
    assert fine.GetDirection() == pytest.approx(thick.GetDirection())
    assert np.allclose(_box_corners(fine), _box_corners(thick), atol=1e-6)
    # intensities follow the input (the phantom is piecewise constant: compare away from edges)
    centre = thick.TransformIndexToPhysicalPoint((20, 22, 4))
    assert fine.GetPixel(fine.TransformPhysicalPointToIndex(centre)) == pytest.approx(thick.GetPixel((20, 22, 4)), abs=1.0)


@pytest.mark.unit
def test_an_input_at_least_as_fine_is_left_as_it_is():
    image = make_image((20, 20, 20), (0.8, 1.0, 1.0), np.eye(3), fn=phantom_fn)
    assert finer_output_grid(image, 1.0) is image
    mixed = finer_output_grid(make_image((20, 20, 8), (0.8, 1.0, 3.0), np.eye(3), fn=phantom_fn), 1.0)
    assert mixed.GetSpacing() == pytest.approx((0.8, 1.0, 1.0))


@pytest.mark.integration
def test_segmenting_a_thick_scan_answers_on_the_finer_grid(untrained_model):
    from msdseg.core.settings import SegmentSettings
    from msdseg.inference.pipeline import segment_image

    thick = make_image((56, 64, 12), (3.0, 3.0, 5.0), np.eye(3), fn=phantom_fn)
    before = sitk.GetArrayFromImage(thick).copy()
    settings = SegmentSettings(preset="fast", steps=0, model=untrained_model, uncertainty=True, output_mm=2.0)
    result = segment_image(thick, settings)
    assert result.labels.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert result.uncertainty.GetSize() == result.labels.GetSize() == (84, 96, 30)
    assert np.allclose(_box_corners(result.labels), _box_corners(thick), atol=1e-6)
    assert result.info["output_spacing_mm"] == [2.0, 2.0, 2.0]
    assert np.array_equal(sitk.GetArrayFromImage(thick), before)  # the input is not modified

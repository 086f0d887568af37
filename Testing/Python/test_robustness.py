"""Robustness variants: each stores the same anatomy differently (physical space preserved), and the
runner scores every variant through a file round trip."""
import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.evaluation.robustness import VARIANTS, run

pytestmark = pytest.mark.unit


def _head() -> sitk.Image:
    shape = (40, 48, 36)  # z, y, x for GetImageFromArray
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    arr = 100.0 * ((x / 14) ** 2 + (y / 18) ** 2 + (z / 15) ** 2 < 1) + 50.0 * (x > 4)
    arr += 20.0 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / 300.0)  # shading: stored as integers it has many grey levels
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((2.0, 2.0, 2.0))  # a 72 x 96 x 80 mm field of view passes the input checks
    img.SetOrigin((-20.0, 10.0, 5.0))
    return img


def _back_on(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(),
                                                sitk.sitkLinear, 0.0))


def test_every_variant_keeps_the_anatomy_where_it_was():
    head = _head()
    ref = sitk.GetArrayFromImage(head)
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(head > 0, sitk.sitkUInt8), [4, 4, 4])) > 0
    for name, make in VARIANTS.items():
        variant = make(head)
        back = _back_on(variant, head)
        scale = back[inner].max() / ref[inner].max()
        agreement = np.corrcoef(back[inner].ravel(), ref[inner].ravel())[0, 1]
        assert agreement > 0.9, (name, agreement)
        assert scale > 0, name
    assert VARIANTS["axes permuted and flipped"](head).GetDirection() != head.GetDirection()
    assert VARIANTS["5 mm thick slices"](head).GetSpacing()[2] == 5.0
    assert VARIANTS["12-bit integers"](head).GetPixelID() == sitk.sitkInt16
    shaded = sitk.GetArrayFromImage(VARIANTS["bias field (x0.67-2.2)"](head))
    ratio = shaded[ref > 0] / ref[ref > 0]
    assert 0.6 < ratio.min() < 0.75 and 2.0 < ratio.max() < 2.3, (ratio.min(), ratio.max())


def test_runner_goes_through_a_file_and_scores_each_variant():
    head = _head()
    seen = []

    def segment(image):
        seen.append((image.GetPixelID(), image.GetSize()))
        arr = sitk.GetArrayFromImage(image)
        labels = sitk.GetImageFromArray((arr > arr.mean()).astype(np.uint8))  # a stand-in for the network
        labels.CopyInformation(image)
        return labels

    rows = run(head, head, segment, lambda labels, variant: {"dice_mean_leaves": float(sitk.GetArrayFromImage(labels).mean())})
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert all(pid == sitk.sitkFloat32 for pid, _ in seen)  # read back as the CLI reads (float32)
    assert all(0 < r["dice_mean_leaves"] < 1 and r["seconds"] >= 0 for r in rows)

"""Shared test fixtures (small synthetic volumes with known geometry, the label tree, an untrained
model) and the check that every test is in exactly one tier (see Testing/README.md)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from shared import TREE

TIERS = ("unit", "integration", "slow", "browser")


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by `-m`
def pytest_collection_modifyitems(config, items):
    """Give each test exactly one tier, and refuse to run if one has none or several.

    A module states its tier once (``pytestmark = pytest.mark.unit``) and a test overrides it with
    its own tier marker: the nearest node that names a tier decides (test, then class, then module).
    The decided tier is then the test's only tier marker, so ``-m unit`` does not also select a slow
    test in a unit module.  Failing collection (rather than defaulting to a tier) makes a new test
    without a tier break CI instead of silently landing in the wrong selection."""
    problems = []
    for item in items:
        tiers: list[str] = []
        for node in reversed(item.listchain()):
            tiers = sorted({mark.name for mark in node.own_markers if mark.name in TIERS})
            if tiers:
                break
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
            continue
        item.own_markers[:] = [mark for mark in item.own_markers if mark.name not in TIERS]
        item.add_marker(tiers[0])
    if problems:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker ({', '.join(TIERS)}; see Testing/README.md):\n  "
            + "\n  ".join(problems))
    for parent in {node for item in items for node in item.listchain()[:-1]}:
        parent.own_markers[:] = [mark for mark in parent.own_markers if mark.name not in TIERS]


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_image(size, spacing, direction, centre_lps=(0.0, 0.0, 0.0), fn=None, dtype=np.float32) -> sitk.Image:
    """Image whose voxel (i, j, k) holds ``fn(lps_points)``; centred on ``centre_lps``."""
    size = tuple(int(s) for s in size)
    direction = np.asarray(direction, float)
    spacing = np.asarray(spacing, float)
    half = (np.array(size) - 1) / 2.0
    origin = np.asarray(centre_lps) - direction @ (spacing * half)
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin(origin.tolist())
    if fn is not None:
        k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
        idx = np.stack([i, j, k], -1).astype(float)
        pts = idx * spacing @ direction.T + origin
        arr = fn(pts).astype(dtype)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return out
    return img


def phantom_fn(pts_lps: np.ndarray) -> np.ndarray:
    """A head-like ellipsoid with a brighter blob in the LEFT hemisphere (LPS +x = left)."""
    x, y, z = pts_lps[..., 0], pts_lps[..., 1], pts_lps[..., 2]
    head = (x / 70) ** 2 + (y / 90) ** 2 + (z / 70) ** 2 < 1
    blob = ((x - 30) / 20) ** 2 + (y / 25) ** 2 + (z / 20) ** 2 < 1
    return 100.0 * head + 300.0 * blob


@pytest.fixture
def oblique_phantom() -> sitk.Image:
    d = rotation(0.3, -0.2, 0.5) @ np.diag([1, -1, 1])  # rotated and flipped
    return make_image((64, 80, 40), (2.5, 2.2, 4.0), d, (5.0, -10.0, 20.0), phantom_fn)


@pytest.fixture(scope="session")
def tree():
    """The default label tree (the same object as ``shared.TREE``)."""
    return TREE


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> str:
    """A randomly initialised model file flagged untrained: pipeline tests must not depend on the
    shipped weights (and an untrained model skips the brain-volume plausibility check)."""
    torch = pytest.importorskip("torch")

    from msdseg.model.modelfile import save_model
    from msdseg.model.network import ModelConfig, MultiscaleDiffUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "untrained.safetensors"
    return str(save_model(MultiscaleDiffUNet(ModelConfig()), path, {"trained": False, "name": "untrained-test"}))

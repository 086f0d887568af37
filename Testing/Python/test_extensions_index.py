"""The catalog entry and the top-level CMakeLists.txt pass the Extensions Index's rules, offline.

``extensions_index_check`` applies the rules of Slicer/ExtensionsIndex's
``scripts/check_description_files.py`` (and of its reviewers) to this checkout; the first test
runs every check on the real files, the others show that each check rejects the defect it is for,
on a copy of the real files with one thing broken.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import extensions_index_check as index

pytestmark = pytest.mark.unit

RAW = "https://raw.githubusercontent.com/MultiscaleDiffSeg/SlicerMultiscaleDiffSeg/main/"


#: Checks this repository cannot pass by itself: the Extensions Index wants contributors named as
#: people ("Name (Organisation)"), and only the project's owners can give those names.  Strict, so
#: the test fails as soon as the names are filled in and the mark can go.
NEEDS_OWNERS = {"contributors"}


@pytest.mark.integration  # asks git which files a clone would contain
@pytest.mark.parametrize("check", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="contributor names must come from the owners"))
    if name in NEEDS_OWNERS else name
    for name in index.CHECKS
])
def test_this_extension_passes(check):
    problems = index.CHECKS[check](index.Extension.load())
    assert [str(p) for p in problems] == []


def test_the_catalog_and_cmake_declare_the_pytorch_extension():
    ext = index.Extension.load()
    assert ext.catalog["build_dependencies"] == ["PyTorch"]
    assert ext.cmake_setting("EXTENSION_DEPENDS") == "PyTorch"


# ----------------------------------------------------------------------------- each check bites
@pytest.fixture
def copy(tmp_path) -> Path:
    """The catalog entry, CMakeLists.txt, LICENSE and every image the URLs name, in a fresh folder."""
    ext = index.Extension.load()
    (tmp_path / "docs").mkdir()
    shutil.copy(ext.catalog_path, tmp_path / "docs" / ext.catalog_path.name)
    shutil.copy(index.REPO / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    shutil.copy(index.REPO / "LICENSE", tmp_path / "LICENSE")
    urls = [ext.cmake_setting("EXTENSION_ICONURL"), *ext.cmake_setting("EXTENSION_SCREENSHOTURLS").split()]
    for url in urls:
        relative = url.split("/main/", 1)[1]
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(index.REPO / relative, tmp_path / relative)
    return tmp_path


def load(folder: Path) -> index.Extension:
    return index.Extension.load(folder, folder / "docs" / "MultiscaleDiffSeg.json")


def edit_cmake(folder: Path, old: str, new: str) -> None:
    path = folder / "CMakeLists.txt"
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


def edit_catalog(folder: Path, **changes) -> None:
    path = folder / "docs" / "MultiscaleDiffSeg.json"
    entry = json.loads(path.read_text(encoding="utf-8"))
    entry.update(changes)
    path.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")


def messages(ext: index.Extension, check: str) -> str:
    return "\n".join(p.message for p in index.CHECKS[check](ext))


def test_the_copy_passes_before_anything_is_broken(copy):
    results = index.check_all(load(copy))
    assert {name: problems for name, problems in results.items() if problems and name != "contributors"} == {}


def test_a_screenshot_that_is_not_in_the_repository(copy):
    edit_cmake(copy, "docs/images/demo_overlay.png", "Resources/Screenshots/1.png")
    assert "Resources/Screenshots/1.png, which does not exist" in messages(load(copy), "images")


def test_a_screenshot_in_another_repository_or_revision(copy):
    other_revision = RAW.replace("/main/", "/v0.1/")
    edit_cmake(copy, f"{RAW}docs/images/demo_overlay.png", f"{other_revision}docs/images/demo_overlay.png")
    assert "revision 'v0.1'" in messages(load(copy), "images")
    edit_cmake(copy, "MultiscaleDiffSeg/SlicerMultiscaleDiffSeg/v0.1", "someone/SlicerOther/main")
    assert "not in the repository of scm_url" in messages(load(copy), "images")


def test_an_icon_that_is_not_an_image(copy):
    edit_cmake(copy, "main/Resources/MultiscaleDiffSeg.png", "main/docs/MultiscaleDiffSeg.json")
    assert "not a PNG, JPEG or GIF" in messages(load(copy), "images")


def test_no_licence_file(copy):
    (copy / "LICENSE").unlink()
    assert "no licence file" in messages(load(copy), "license")


def test_anonymous_contributors_and_a_named_person(copy):
    assert "MultiscaleDiffSeg contributors" in messages(load(copy), "contributors")
    edit_cmake(copy, '"MultiscaleDiffSeg contributors"', '"Core team (Some Hospital)"')
    assert "names a group" in messages(load(copy), "contributors")
    edit_cmake(copy, '"Core team (Some Hospital)"', '"Jane Roe (Some Hospital), John Doe (Some University)"')
    assert messages(load(copy), "contributors") == ""


def test_dependencies_that_disagree_or_do_not_exist(copy):
    edit_catalog(copy, build_dependencies=[])
    assert "differ from CMake EXTENSION_DEPENDS ['PyTorch']" in messages(load(copy), "build_dependencies")
    edit_catalog(copy, build_dependencies=["PyTorch", "NoSuchExtension"])
    edit_cmake(copy, 'set(EXTENSION_DEPENDS "PyTorch")', 'set(EXTENSION_DEPENDS "PyTorch NoSuchExtension")')
    assert "'NoSuchExtension' is not an extension of the index" in messages(load(copy), "build_dependencies")


def test_a_catalog_entry_the_schema_refuses(copy):
    edit_catalog(copy, tier=9)
    assert "9 is greater than the maximum of 5" in messages(load(copy), "json_schema")
    edit_catalog(copy, tier=1, homepage="https://example.org")  # not a key of the catalog-entry schema
    assert "Additional properties are not allowed ('homepage'" in messages(load(copy), "json_schema")


def test_crlf_line_endings_and_an_unknown_category(copy):
    path = copy / "docs" / "MultiscaleDiffSeg.json"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert "CRLF" in messages(load(copy), "json_file_format")
    edit_catalog(copy, category="Brain Things")
    assert "'Brain Things' is not one the index accepts" in messages(load(copy), "category")


def test_names_the_index_rejects(copy):
    edit_catalog(copy, scm_url="ftp://github.com/MultiscaleDiffSeg/MultiscaleDiffSeg.git", scm_revision="")
    problems = messages(load(copy), "scm")
    assert "not a git or https URL" in problems and "must start with 'Slicer'" in problems
    assert "scm_revision is missing" in problems
    renamed = copy / "docs" / "SlicerMultiscaleDiffSeg.json"
    (copy / "docs" / "MultiscaleDiffSeg.json").rename(renamed)
    ext = index.Extension.load(copy, renamed)
    assert "must not start with 'Slicer'" in messages(ext, "extension_name")
    assert "differs from the catalog file name" in messages(ext, "cmake_project")


def test_repository_over_the_size_limit(copy, monkeypatch):
    monkeypatch.setattr(index, "SIZE_LIMIT_MB", 0.01)
    assert "over the 0.01 MB limit" in messages(load(copy), "repository_size")


def test_the_command_line_reports_and_fails(copy, capsys):
    edit_catalog(copy, category="Brain Things")
    assert index.main([str(copy), str(copy / "docs" / "MultiscaleDiffSeg.json")]) == 1
    assert "- FAILED category" in capsys.readouterr().out

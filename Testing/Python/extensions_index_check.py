"""Offline check of the extension against the Slicer Extensions Index's own rules.

The Extensions Index runs ``scripts/check_description_files.py`` (Slicer/ExtensionsIndex) on every
catalog entry: it clones the repository and checks the entry's JSON schema and format, the
extension and repository names, the category, the ``scm_url``, the top-level ``CMakeLists.txt``
(project name, icon and screenshot URLs that must serve images), the repository size and a
licence file at the root.  This file applies the same rules offline to this checkout, plus the
ones reviewers ask for: build dependencies that agree between the catalog entry and CMake's
``EXTENSION_DEPENDS`` and name extensions that exist in the index, image URLs that point at
files of this repository at the catalog's revision, and contributors named as people.

What cannot be checked offline and is not: the GitHub topic ``3d-slicer-extension`` and that
GitHub really serves the committed files.

Fixtures (``Testing/Data/extensions_index``, see LICENSE-NOTE.md there): the catalog-entry JSON
schema from Slicer/Slicer, the accepted categories and the catalog entries of the dependencies
from Slicer/ExtensionsIndex.

Usage: ``python Testing/Python/extensions_index_check.py [REPO] [CATALOG_JSON]``; prints one line
per check and exits 1 when one fails.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "Testing" / "Data" / "extensions_index"
CATALOG = REPO / "docs" / "MultiscaleDiffSeg.json"

#: Names the index accepts as a licence file at the repository root.
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
#: The repository name must start with one of these ("Slicer" covers the others).
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
SIZE_LIMIT_MB = 100
SCM_SCHEMES = ("git", "https")
#: What the index accepts as an image behind an icon or screenshot URL, by content.
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF"}
#: Words that make a contributor entry a group instead of a person.
COLLECTIVE_WORDS = ("contributors", "contributor", "team", "authors", "developers", "maintainers", "community",
                    "anonymous", "dev", "devs", "project")
RAW_HOST = "raw.githubusercontent.com"


@dataclass(frozen=True)
class Problem:
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


@dataclass
class Extension:
    """What the checks read: the catalog entry, the top-level CMakeLists.txt, the checkout."""

    name: str
    catalog_path: Path
    catalog: dict
    cmake: str
    repo: Path

    @classmethod
    def load(cls, repo: Path = REPO, catalog_path: Path = CATALOG) -> "Extension":
        repo, catalog_path = Path(repo), Path(catalog_path)
        try:
            catalog = json.loads(catalog_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{catalog_path} is not valid JSON: {exc}") from exc
        cmake_path = repo / "CMakeLists.txt"
        cmake = cmake_path.read_text(encoding="utf-8", errors="ignore") if cmake_path.is_file() else ""
        return cls(catalog_path.stem, catalog_path, catalog, cmake, repo)

    def cmake_setting(self, variable: str) -> str | None:
        """The value of ``set(VARIABLE "value")`` (or unquoted) in the top-level CMakeLists.txt."""
        match = re.search(rf'set\s*\(\s*{variable}\s+"([^"]*)"\)', self.cmake, re.IGNORECASE)
        if match is None:
            match = re.search(rf"set\s*\(\s*{variable}\s+([^\s\")]+)\s*\)", self.cmake, re.IGNORECASE)
        return match.group(1).strip() if match else None

    def tracked(self) -> set[str] | None:
        """Files git tracks (what a clone contains), or None outside a git checkout."""
        if not (self.repo / ".git").exists():
            return None
        try:
            run = subprocess.run(["git", "ls-files", "-z"], cwd=self.repo, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if run.returncode != 0:
            return None
        return {name for name in run.stdout.decode("utf-8", "replace").split("\0") if name}


# ----------------------------------------------------------------------------- the checks
def check_json_file_format(ext: Extension) -> list[Problem]:
    content = ext.catalog_path.read_bytes()
    if b"\r" in content:
        return [Problem("json_file_format", f"{ext.catalog_path.name} has CR or CRLF line endings; use LF only")]
    return []


def check_json_schema(ext: Extension) -> list[Problem]:
    try:
        import jsonschema
    except ImportError:
        return [Problem("json_schema", "the jsonschema package is not installed (pip install jsonschema)")]
    url = str(ext.catalog.get("$schema") or "")
    if not url:
        return [Problem("json_schema", "no $schema in the catalog entry")]
    schema_path = FIXTURES / url.split("#")[0].rsplit("/", 1)[-1]
    if not schema_path.is_file():
        return [Problem("json_schema", f"schema {url} is not among the stored fixtures in {FIXTURES}")]
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    if url.split("#")[0] != schema.get("$id", "").split("#")[0]:
        return [Problem("json_schema", f"$schema {url} is not the published URL {schema.get('$id')}")]
    try:
        jsonschema.validate(ext.catalog, schema)
    except jsonschema.ValidationError as exc:
        path = " -> ".join(str(p) for p in exc.absolute_path)
        return [Problem("json_schema", f"{exc.message}" + (f" at {path}" if path else ""))]
    return []


def check_extension_name(ext: Extension) -> list[Problem]:
    if ext.name.lower().startswith("slicer"):
        return [Problem("extension_name", f"the extension name '{ext.name}' must not start with 'Slicer'")]
    return []


def check_category(ext: Extension) -> list[Problem]:
    accepted = json.loads((FIXTURES / "accepted-categories.json").read_text(encoding="utf-8"))["accepted_categories"]
    category = ext.catalog.get("category")
    problems = []
    if category not in accepted:
        problems.append(Problem("category", f"category '{category}' is not one the index accepts"))
    cmake_category = ext.cmake_setting("EXTENSION_CATEGORY")
    if cmake_category != category:
        problems.append(Problem("category", f"CMake EXTENSION_CATEGORY '{cmake_category}' differs from the "
                                            f"catalog's '{category}'"))
    return problems


def _scm(ext: Extension) -> tuple[str, str, str]:
    """(owner, repository, revision) from scm_url and scm_revision."""
    parts = urlsplit(str(ext.catalog.get("scm_url", "")).strip().rstrip("/"))
    path = [p for p in parts.path.split("/") if p]
    owner = path[0] if len(path) >= 2 else ""
    name = path[-1][:-4] if path and path[-1].endswith(".git") else (path[-1] if path else "")
    return owner, name, str(ext.catalog.get("scm_revision", ""))


def check_scm(ext: Extension) -> list[Problem]:
    url = str(ext.catalog.get("scm_url", ""))
    problems = []
    if "://" not in url or urlsplit(url).scheme not in SCM_SCHEMES:
        problems.append(Problem("scm_url", f"scm_url '{url}' is not a {' or '.join(SCM_SCHEMES)} URL"))
    owner, name, revision = _scm(ext)
    if not name.startswith(REPOSITORY_PREFIXES):
        problems.append(Problem("scm_url", f"the repository name '{name}' must start with 'Slicer'"))
    if not revision.strip():
        problems.append(Problem("scm_revision", "scm_revision is missing: the index would build an unknown revision"))
    return problems


def check_cmake_project(ext: Extension) -> list[Problem]:
    if not ext.cmake:
        return [Problem("cmake_project", "no CMakeLists.txt at the repository root")]
    match = re.search(r"project\s*\(\s*([^\s)]+)", ext.cmake, re.IGNORECASE)
    project = match.group(1).strip("\"'") if match else None
    if project != ext.name:
        return [Problem("cmake_project", f"CMake project name '{project}' differs from the catalog file name "
                                         f"'{ext.name}'")]
    return []


def _image_problem(ext: Extension, url: str, what: str, tracked: set[str] | None) -> str | None:
    """Why ``url`` would not serve an image of this repository at the catalog's revision."""
    owner, name, revision = _scm(ext)
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme != "https" or parts.netloc != RAW_HOST or len(path) < 4:
        return f"{what} '{url}' is not a https://{RAW_HOST}/OWNER/REPOSITORY/REVISION/PATH URL"
    if (path[0].lower(), path[1].lower()) != (owner.lower(), name.lower()):
        return f"{what} '{url}' is not in the repository of scm_url ({owner}/{name})"
    if path[2] != revision:
        return f"{what} '{url}' is at revision '{path[2]}', the catalog builds '{revision}'"
    relative = "/".join(path[3:])
    file = ext.repo / relative
    if not file.is_file():
        return f"{what} '{url}' points to {relative}, which does not exist in the repository"
    if tracked is not None and relative not in tracked:
        return f"{what} '{url}' points to {relative}, which git does not track (a clone would not have it)"
    head = file.read_bytes()[:8]
    if not any(head.startswith(signature) for signature in IMAGE_SIGNATURES):
        return f"{what} '{url}' points to {relative}, which is not a PNG, JPEG or GIF image"
    return None


def check_images(ext: Extension) -> list[Problem]:
    tracked = ext.tracked()
    problems = []
    icon = ext.cmake_setting("EXTENSION_ICONURL")
    screenshots = (ext.cmake_setting("EXTENSION_SCREENSHOTURLS") or "").split()
    if not icon:
        problems.append(Problem("icon_url", "no EXTENSION_ICONURL in CMakeLists.txt"))
    elif (reason := _image_problem(ext, icon, "EXTENSION_ICONURL", tracked)) is not None:
        problems.append(Problem("icon_url", reason))
    if not screenshots:
        problems.append(Problem("screenshot_urls", "no EXTENSION_SCREENSHOTURLS in CMakeLists.txt"))
    for url in screenshots:
        if (reason := _image_problem(ext, url, "EXTENSION_SCREENSHOTURLS", tracked)) is not None:
            problems.append(Problem("screenshot_urls", reason))
    return problems


def check_build_dependencies(ext: Extension) -> list[Problem]:
    listed = ext.catalog.get("build_dependencies", [])
    depends = ext.cmake_setting("EXTENSION_DEPENDS")
    if depends is None:
        return [Problem("build_dependencies", "no EXTENSION_DEPENDS in CMakeLists.txt (\"NA\" when there are none)")]
    in_cmake = [] if depends.strip() in ("", "NA") else depends.replace(";", " ").split()
    problems = []
    if sorted(listed) != sorted(in_cmake):
        problems.append(Problem("build_dependencies", f"catalog build_dependencies {sorted(listed)} differ from "
                                                      f"CMake EXTENSION_DEPENDS {sorted(in_cmake)}"))
    for dependency in listed:
        if not (FIXTURES / f"{dependency}.json").is_file():
            problems.append(Problem("build_dependencies", f"'{dependency}' is not an extension of the index "
                                                          f"(no {dependency}.json among the stored catalog entries)"))
    return problems


def check_contributors(ext: Extension) -> list[Problem]:
    text = ext.cmake_setting("EXTENSION_CONTRIBUTORS") or ""
    if not text:
        return [Problem("contributors", "no EXTENSION_CONTRIBUTORS in CMakeLists.txt")]
    problems = []
    for entry in (part.strip() for part in text.split(",")):
        person = entry.split("(")[0].strip()
        words = set(re.findall(r"[a-z]+", person.lower()))
        if not re.fullmatch(r"[^()]+\([^()]+\)", entry):
            problems.append(Problem("contributors", f"'{entry}' is not 'Name (Organisation)'"))
        elif words & set(COLLECTIVE_WORDS) or ext.name.lower() in person.lower().replace(" ", ""):
            problems.append(Problem("contributors", f"'{entry}' names a group, not a person"))
    return problems


def check_license(ext: Extension) -> list[Problem]:
    if not any((ext.repo / name).is_file() for name in LICENSE_NAMES):
        return [Problem("license", f"no licence file ({', '.join(LICENSE_NAMES)}) at the repository root")]
    return []


def repository_size_mb(ext: Extension) -> float:
    """Size of what a clone contains (tracked files; every file outside hidden folders without git)."""
    tracked = ext.tracked()
    if tracked is not None:
        files = [ext.repo / name for name in tracked]
    else:
        files = [path for path in ext.repo.rglob("*")
                 if not any(part.startswith(".") for part in path.relative_to(ext.repo).parts)]
    return sum(f.stat().st_size for f in files if f.is_file()) / (1024 * 1024)


def check_repository_size(ext: Extension) -> list[Problem]:
    size = repository_size_mb(ext)
    if size > SIZE_LIMIT_MB:
        return [Problem("repository_size", f"the repository is {size:.1f} MB, over the {SIZE_LIMIT_MB} MB limit")]
    return []


CHECKS: dict[str, Callable[[Extension], list[Problem]]] = {
    "json_file_format": check_json_file_format,
    "json_schema": check_json_schema,
    "extension_name": check_extension_name,
    "category": check_category,
    "scm": check_scm,
    "cmake_project": check_cmake_project,
    "images": check_images,
    "build_dependencies": check_build_dependencies,
    "contributors": check_contributors,
    "license": check_license,
    "repository_size": check_repository_size,
}


def check_all(ext: Extension) -> dict[str, list[Problem]]:
    return {name: check(ext) for name, check in CHECKS.items()}


def main(argv: list[str]) -> int:
    repo = Path(argv[0]) if argv else REPO
    catalog = Path(argv[1]) if len(argv) > 1 else repo / "docs" / "MultiscaleDiffSeg.json"
    results = check_all(Extension.load(repo, catalog))
    for name, problems in results.items():
        print(f"- {'ok' if not problems else 'FAILED'} {name}")
        for problem in problems:
            print(f"    {problem.message}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

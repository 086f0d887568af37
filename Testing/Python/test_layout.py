"""The package layout holds: import contracts, what the Slicer extension ships, the public API."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MultiscaleDiffSeg"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _runtime_packages_in_cmake() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    match = re.search(r"set\(MSDSEG_RUNTIME_PACKAGES ([^)]*)\)", text)
    assert match, "MSDSEG_RUNTIME_PACKAGES not found in MultiscaleDiffSeg/CMakeLists.txt"
    return match.group(1).split()


def _contract(name_start: str) -> dict:
    return next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["name"].startswith(name_start))


@pytest.mark.integration
def test_import_contracts_are_kept():
    result = _lint()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.integration
def test_a_wrong_way_import_breaks_the_contracts(tmp_path):
    """The contracts are not vacuous: the runtime importing the training code fails the lint."""
    copy = tmp_path / "src"
    for name in ("msdseg", "MultiscaleDiffSegLib", "msdseg_web"):
        shutil.copytree(MODULE_DIR / name, copy / name, ignore=shutil.ignore_patterns("models", "__pycache__"))
    labels = copy / "msdseg" / "core" / "labels.py"
    labels.write_text(labels.read_text() + "\nfrom msdseg.training import synth  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    result = _lint(env)
    assert result.returncode != 0
    assert "msdseg.core.labels -> msdseg.training.synth" in result.stdout


@pytest.mark.unit
def test_the_extension_ships_exactly_the_runtime_packages():
    """CMake's list of shipped subpackages is the runtime of the import contract, and every other
    subpackage is lab code that the runtime may not import."""
    shipped = set(_runtime_packages_in_cmake())
    runtime = {m.split(".", 1)[1] for m in _contract("The runtime never imports")["source_modules"]
               if m.startswith("msdseg.")}
    assert shipped == runtime
    subpackages = {p.name for p in (MODULE_DIR / "msdseg").iterdir() if (p / "__init__.py").exists()}
    lab = {m.split(".", 1)[1] for m in _contract("The runtime never imports")["forbidden_modules"]}
    assert subpackages == shipped | lab
    for package in shipped:  # the CMake glob is not recursive: runtime packages must stay flat
        nested = [p for p in (MODULE_DIR / "msdseg" / package).iterdir() if (p / "__init__.py").exists()]
        assert not nested, f"msdseg/{package} has nested packages the extension would not ship: {nested}"


@pytest.mark.integration
def test_the_shipped_runtime_runs_without_the_lab(tmp_path):
    """Only the files the extension installs: the CLI runs, and lab commands say what is missing."""
    dest = tmp_path / "ext" / "msdseg"
    src = MODULE_DIR / "msdseg"
    dest.mkdir(parents=True)
    for f in src.glob("*.py"):
        shutil.copy(f, dest / f.name)
    for package in _runtime_packages_in_cmake():
        (dest / package).mkdir()
        for f in (src / package).glob("*.py"):
            shutil.copy(f, dest / package / f.name)
    shutil.copytree(src / "resources", dest / "resources", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(dest.parent)}
    code = ("import importlib, pkgutil, msdseg\n"
            "assert msdseg.__file__.startswith(%r), msdseg.__file__\n"
            "for m in pkgutil.walk_packages(msdseg.__path__, 'msdseg.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "print('ok')\n") % str(dest)
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr[-2000:]
    info = subprocess.run([sys.executable, "-m", "msdseg", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert info.returncode == 0, info.stderr
    assert '"model_trained": true' in info.stdout
    train = subprocess.run([sys.executable, "-m", "msdseg", "train", "--data", "x"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 2
    assert train.stderr.strip().splitlines() == [
        "msdseg: error: 'msdseg train' is part of the full msdseg package (pip install msdseg); "
        "this installation ships only the segmentation runtime"]


@pytest.mark.unit
def test_every_optional_command_is_installed_in_the_full_package():
    from msdseg.cli.commands import OPTIONAL_COMMANDS, load

    for command in OPTIONAL_COMMANDS:
        module = load(command)
        assert module is not None, command.module
        assert callable(module.add_arguments) and callable(module.run)


@pytest.mark.integration  # a fresh interpreter: a subprocess
def test_public_api_is_importable_without_torch_until_used():
    """``import msdseg`` and its settings load without torch (the Slicer GUI process may lack it);
    the public names resolve on first use."""
    code = ("import sys, msdseg\n"
            "s = msdseg.SegmentSettings(preset='fast')\n"
            "assert 'torch' not in sys.modules, 'torch imported by msdseg or its settings'\n"
            "assert callable(msdseg.segment_image) and callable(msdseg.segment_file)\n"
            "assert callable(msdseg.load_model) and msdseg.load_tree().root.id == 'brain'\n"
            "print(sorted(msdseg.__all__))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.unit
def test_the_architecture_diagram_names_every_module_and_no_other():
    """docs/architecture.md's layer diagram lists each subpackage's modules; it must match the code."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1]
    rows: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"^ (?:\w+)?\s+msdseg\.(\w+)\s+(.*)$", line)
        if match:
            current, rest = match.group(1), match.group(2)
            rows[current] = set()
        elif current and re.fullmatch(r" {30,}[a-z_/, ]+", line):
            rest = line
        else:
            current = None
            continue
        rest = re.sub(r"\([^)]*\)", "", rest)
        rows[current] |= {w.strip().rstrip("/") for w in rest.split(",") if w.strip()}
    src = MODULE_DIR / "msdseg"
    for package, listed in rows.items():
        if package == "resources":
            continue
        actual = {p.stem for p in (src / package).glob("*.py") if not p.stem.startswith("__")}
        actual |= {p.name for p in (src / package).iterdir() if (p / "__init__.py").exists()}
        assert listed == actual, f"msdseg.{package}: diagram {sorted(listed)} vs code {sorted(actual)}"
    subpackages = {p.name for p in src.iterdir() if (p / "__init__.py").exists()}
    assert set(rows) == subpackages


@pytest.mark.unit
def test_the_product_never_mentions_work_sessions():
    """Docs and code speak to users; the only 'session' is the browser app's own Session object."""
    hits = []
    for path in [*(ROOT / "docs").rglob("*.md"), *(MODULE_DIR).rglob("*.py"), ROOT / "README.md",
                 ROOT / "CHANGELOG.md"]:
        if "msdseg_web" in path.parts or "__pycache__" in path.parts:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"\bsessions?\b", line, re.IGNORECASE) and "`Session`" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits[:10])


@pytest.mark.unit
def test_the_model_card_is_short_and_has_the_standard_sections():
    card = (ROOT / "docs" / "model_card.md").read_text()
    assert len(card.encode()) < 12 * 1024
    headings = [h.lower() for h in re.findall(r"^## (.+)$", card, re.M)]
    for section in ("model details", "intended use", "out-of-scope", "training data", "evaluation data",
                    "results", "limitations", "reproduce"):
        assert any(section in h for h in headings), f"model card lacks a '{section}' section: {headings}"


@pytest.mark.unit
def test_every_test_named_in_the_reliability_table_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 10
    for filename, test in named:
        source = (ROOT / "Testing" / "Python" / filename).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{filename}::{test} named in docs/reliability.md"

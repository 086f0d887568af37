"""The dependency step tells the truth: what gets installed on this platform, and pip's own reason
when it fails.

The pip tests run Slicer's real ``slicer.util.pip_install`` (the copy slicer-core installs, whose
``pip_install`` / ``_executePythonModule`` / ``launchConsoleProcess`` / ``logProcessOutput`` are the
same as in Slicer v5.8.0 and v5.10.0) against a real pip subprocess that fails offline.  Slicer
finds ``PythonSlicer`` next to ``sys.executable`` when no application is running; the test puts a
two-line launcher there that starts this Python, as Slicer's own launcher starts its Python.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from MultiscaleDiffSegLib import dependencies as deps

pytestmark = pytest.mark.unit

INSTALLED = {"torch": "2.13.0", "monai": "1.6.1", "safetensors": "0.8.0", "pynrrd": "1.1.3", "slicerio": "1.4.0",
             "nibabel": "5.4.2", "numpy": "2.4.6", "SimpleITK": "2.5.5", "scipy": "1.17.1"}
NO_TORCH = {**INSTALLED, "torch": None}
MISSING_PACKAGE = "nonexistent-pkg-xyz"


def on(system: str, machine: str, extension: bool = False, versions: dict | None = None) -> deps.Environment:
    return deps.Environment(versions=versions or NO_TORCH, pytorch_extension=extension, system=system, machine=machine)


# ----------------------------------------------------------------------------- what gets installed where
def test_the_pytorch_extension_route_says_everything_it_installs_and_that_torch_enters_slicer():
    text = deps.plan_installation(on("Linux", "x86_64", extension=True)).confirmation_text()
    for needed in ("light-the-torch", "torchvision", "torch", "pip", "imports torch into Slicer's own process",
                   "NVIDIA driver"):
        assert needed in text, needed


def test_windows_without_the_extension_is_told_pypi_torch_is_cpu_only():
    plan = deps.plan_installation(on("Windows", "AMD64"))
    assert plan.torch_action == "pip"
    text = plan.confirmation_text()
    assert f"PyTorch {deps.TORCH.pin} from PyPI" in text and "CPU-only" in text and "PyTorch extension" in text


@pytest.mark.parametrize("system, machine, build", [("Linux", "x86_64", "CUDA build"), ("Darwin", "arm64", "MPS")])
def test_other_platforms_are_told_which_pypi_build_they_get(system, machine, build):
    assert build in deps.plan_installation(on(system, machine)).confirmation_text()


@pytest.mark.parametrize("machine", ["x86_64", "i386"])
def test_intel_macs_are_refused_before_anything_is_asked_or_installed(machine, tmp_path):
    plan = deps.plan_installation(on("Darwin", machine, extension=True))
    assert plan.problems and "Intel Mac" in plan.problems[0] and deps.LAST_TORCH_FOR_INTEL_MAC in plan.problems[0]
    assert plan.torch_action == "none"
    asked: list[str] = []
    with pytest.raises(RuntimeError, match="not available for Intel Macs"):
        deps.ensure(lambda: on("Darwin", machine), asked.append, pytest.fail, pytest.fail, tmp_path)
    assert asked == []


def test_an_intel_mac_with_a_usable_torch_already_installed_is_not_refused():
    assert deps.plan_installation(on("Darwin", "x86_64", versions=INSTALLED)).ok


def test_nothing_about_pytorch_sizes_when_only_small_packages_are_missing():
    text = deps.plan_installation(on("Linux", "x86_64", versions={**INSTALLED, "nibabel": None})).confirmation_text()
    assert "nibabel==5.4.2" in text and "PyTorch" not in text


# ----------------------------------------------------------------------------- pip's reason, with real pip
@pytest.fixture
def slicer_pip(tmp_path, monkeypatch):
    """Slicer's real ``slicer.util.pip_install``, running pip offline in a clean configuration."""
    slicer = pytest.importorskip("slicer")
    import slicer.util

    monkeypatch.delattr(slicer, "app", raising=False)  # "running from console": no application
    launcher = tmp_path / "bin" / "PythonSlicer"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(launcher.parent / "python"))  # Slicer looks next to it
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no site index, links or constraints
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: nothing can be found, nothing is installed
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return slicer.util.pip_install


@pytest.mark.integration
def test_slicers_pip_install_error_itself_carries_only_the_command_line(slicer_pip, capsys):
    """The behaviour this module works around (Slicer 5.8-5.10): pip's reason is printed, not raised."""
    with pytest.raises(subprocess.CalledProcessError) as raised:
        slicer_pip([MISSING_PACKAGE])
    assert "returned non-zero exit status" in str(raised.value)
    assert "No matching distribution" not in str(raised.value)
    assert f"No matching distribution found for {MISSING_PACKAGE}" in capsys.readouterr().out


@pytest.mark.integration
def test_run_pip_raises_with_pips_own_reason(slicer_pip, capsys):
    with pytest.raises(deps.InstallError) as raised:
        deps.run_pip(slicer_pip, [MISSING_PACKAGE])
    reason = str(raised.value)
    assert f"No matching distribution found for {MISSING_PACKAGE}" in reason
    assert reason.startswith("ERROR:") and "non-zero exit status" not in reason
    assert f"No matching distribution found for {MISSING_PACKAGE}" in capsys.readouterr().out  # still shown


@pytest.mark.integration
def test_a_failed_install_tells_the_user_pips_reason_and_what_to_do(slicer_pip, monkeypatch, tmp_path):
    """The whole dependency step with Slicer's pip_install: pip cannot find slicerio offline."""
    monkeypatch.setenv("PIP_IGNORE_INSTALLED", "1")  # the installed copy must not satisfy it
    missing = {**INSTALLED, "slicerio": None}
    with pytest.raises(RuntimeError) as raised:
        deps.ensure(lambda: deps.Environment(missing), lambda text: True, pytest.fail, slicer_pip, tmp_path)
    text = str(raised.value)
    assert text.startswith("Installing the Python packages failed")
    assert "No matching distribution found for slicerio==1.4.0" in text
    assert "non-zero exit status" not in text
    assert "What to do next:" in text and "slicer.util.pip_install(['slicerio==1.4.0'])" in text
    assert "\n  2. Or install by hand" in text  # steps are numbered without gaps


def test_an_installer_that_prints_nothing_still_says_how_it_ended(tmp_path):
    """Slicer's newer pip_install shows pip's output in its own dialog and may print nothing here."""
    def silent_failure(args: list[str]) -> None:
        raise subprocess.CalledProcessError(2, ["PythonSlicer", "-m", "pip", "install", *args])

    with pytest.raises(deps.InstallError, match="exited with status 2 and printed no reason"):
        deps.run_pip(silent_failure, ["nibabel==5.4.2"])


def test_the_pytorch_extensions_failure_keeps_its_own_message(tmp_path):
    def extension_fails(requirement: str) -> bool:
        raise RuntimeError(f"light-the-torch could not resolve torch{requirement}")

    with pytest.raises(RuntimeError) as raised:
        deps.ensure(lambda: on("Linux", "x86_64", extension=True), lambda text: True, extension_fails,
                    pytest.fail, tmp_path)
    assert "the PyTorch extension's installer: light-the-torch could not resolve torch>=2.4.1" in str(raised.value)


@pytest.mark.integration
def test_pip_reason_of_a_real_pip_run_is_its_error_block():
    """pip's reason as pip prints it (a real run, output captured by subprocess here)."""
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--isolated", MISSING_PACKAGE],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert run.returncode != 0
    reason = deps.pip_reason(run.stdout + run.stderr)
    assert reason.splitlines()[0].startswith("ERROR: Could not find a version that satisfies the requirement")
    assert reason.splitlines()[-1] == f"ERROR: No matching distribution found for {MISSING_PACKAGE}"


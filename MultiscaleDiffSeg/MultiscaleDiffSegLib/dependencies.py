"""Which Python packages the worker needs, what is missing, and exactly how to install it.

This module only *decides* (and is unit-tested); the Slicer logic *acts* on the plan with
``PyTorchUtils`` and ``slicer.util.pip_install``.  Rules:

* Slicer's own packages (numpy, SimpleITK, VTK, scipy) are never installed, upgraded or replaced:
  they are built or pinned for Slicer and other modules rely on them.  pip runs with a constraints
  file that pins whatever of them (and torch) is installed, so a package that would need another
  version fails to install instead of silently replacing Slicer's copy.
* PyTorch comes from the PyTorch extension (``PyTorchUtils``) when it is installed: it picks the
  CUDA build that matches the NVIDIA driver.  Without it, a pinned torch from PyPI.
* MONAI is installed with ``--no-deps``: its only dependencies are torch and numpy, which must
  not be touched, and its declared torch range would otherwise pull a PyPI torch over the one
  from the PyTorch extension.
* Everything is pinned to versions the core was tested with; versions already installed are
  accepted when they are inside the range that works.
* The versions are read from package metadata, never by importing: importing torch into Slicer's
  process would load GPU libraries the worker process is meant to keep out.  (The PyTorch
  extension's installer does import torch into Slicer's process once; the question says so.)
* The question names everything that will be installed, the platform's build of PyTorch, and
  refuses before asking where no usable PyTorch exists (Intel macOS).
* When pip fails, the user reads pip's own reason.  Slicer's ``pip_install`` (5.8 to 5.10) prints
  pip's output line by line and then raises ``CalledProcessError`` whose text is only the command
  line, with no output attached; :func:`run_pip` therefore records what is printed while pip runs.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, TextIO, TypeVar

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Dependency:
    """A package the worker imports."""

    distribution: str  # name on PyPI / in package metadata
    module: str  # import name
    accept: str  # versions that work (PEP 440 specifier)
    pin: str  # exact version installed when missing or outside ``accept``
    purpose: str
    no_deps: bool = False

    @property
    def install_spec(self) -> str:
        return f"{self.distribution}=={self.pin}"


#: The core and the pins below need Python 3.10+; Slicer ships Python 3.12 since 5.10 (3.9 before).
MINIMUM_PYTHON = (3, 10)

#: Minimum torch: MONAI 1.5.1 (the oldest MONAI pin below) declares torch>=2.4.1.
TORCH_REQUIREMENT = ">=2.4.1"
TORCH = Dependency("torch", "torch", TORCH_REQUIREMENT, "2.13.0", "PyTorch: runs the network")

#: MONAI pin by installed torch, newest first: MONAI 1.6.1 declares torch>=2.8, 1.5.1 torch>=2.4.1.
#: Both were run with the core's ``msdseg segment`` (diffusion schedulers, sliding windows).
MONAI_PINS: tuple[tuple[str, str], ...] = (("2.8", "1.6.1"), ("2.4.1", "1.5.1"))

PIP_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("monai", "monai", ">=1.4", "1.6.1", "MONAI: diffusion schedulers, sliding windows", no_deps=True),
    Dependency("safetensors", "safetensors", ">=0.4", "0.8.0", "safetensors: reads the model weights"),
    Dependency("pynrrd", "nrrd", ">=1.0", "1.1.3", "pynrrd: NRRD headers of the outputs"),
    Dependency("slicerio", "slicerio", ">=1.0", "1.4.0", "slicerio: writes the .seg.nrrd output"),
    Dependency("nibabel", "nibabel", ">=5.0", "5.4.2", "nibabel: reads FreeSurfer .mgz inputs"),
)

#: What the PyTorch extension (``PyTorchUtils.installTorch``) does, read from SlicerPyTorch's source.
PYTORCH_EXTENSION_INSTALLS = (
    "light-the-torch (installed with pip first; it requires its own range of pip versions, so Slicer's "
    "pip may be replaced), then torch and torchvision, the CUDA build that matches your NVIDIA driver "
    "or else the CPU build; it then imports torch into Slicer's own process, where it stays loaded until "
    "Slicer is restarted (on Windows it cannot be upgraded before that)"
)

#: The last PyTorch with wheels for Intel macs (x86_64) on PyPI; every version we accept is newer.
LAST_TORCH_FOR_INTEL_MAC = "2.2.2"

#: Slicer's own builds: checked, never installed.  ``None`` = no pip metadata to pin (VTK).
PROTECTED: tuple[tuple[str, str | None], ...] = (
    ("numpy", "numpy"),
    ("SimpleITK", "SimpleITK"),
    ("vtk", None),
    ("scipy", "scipy"),
)


# --------------------------------------------------------------------------- environment facts
@dataclass(frozen=True)
class Environment:
    """What is installed: distribution -> version (None when missing), and extension presence."""

    versions: Mapping[str, str | None]
    importable: Mapping[str, bool] = field(default_factory=dict)
    pytorch_extension: bool = False
    python: tuple[int, int] = (sys.version_info.major, sys.version_info.minor)
    system: str = platform.system()  # Windows | Linux | Darwin
    machine: str = platform.machine()  # x86_64 / AMD64 / arm64 / aarch64: what Slicer's Python runs as

    @property
    def intel_mac(self) -> bool:
        """macOS with an x86_64 Python: an Intel Mac, or an Intel build of Slicer under Rosetta."""
        return self.system == "Darwin" and self.machine.lower() in ("x86_64", "amd64", "i386")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_importable(module: str) -> bool:
    """Whether ``import module`` would find something, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe_environment(pytorch_extension: bool | None = None) -> Environment:
    """Read the current Python environment (metadata and import specs only)."""
    names = [TORCH.distribution] + [d.distribution for d in PIP_DEPENDENCIES]
    names += [dist for _, dist in PROTECTED if dist]
    importlib.invalidate_caches()  # packages installed a moment ago must be seen
    modules = [TORCH.module] + [d.module for d in PIP_DEPENDENCIES] + [m for m, _ in PROTECTED]
    if pytorch_extension is None:
        pytorch_extension = module_importable("PyTorchUtils")
    return Environment(
        versions={n: installed_version(n) for n in names},
        importable={m: module_importable(m) for m in modules},
        pytorch_extension=bool(pytorch_extension),
    )


# --------------------------------------------------------------------------- the plan
@dataclass
class InstallPlan:
    """What to do before the first segmentation; empty when everything is there."""

    torch_action: str = "none"  # none | pytorch_extension | pip
    torch_reason: str = ""
    pip_no_deps: list[str] = field(default_factory=list)
    pip_constrained: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # cannot be fixed by installing
    items: list[str] = field(default_factory=list)  # human-readable list for the confirmation

    @property
    def needed(self) -> bool:
        return self.torch_action != "none" or bool(self.pip_no_deps or self.pip_constrained)

    @property
    def ok(self) -> bool:
        return not self.needed and not self.problems

    def pip_commands(self, constraints_file: str | os.PathLike) -> list[list[str]]:
        """Argument lists for ``slicer.util.pip_install`` (one call per list, in order).

        Lists rather than strings: every Slicer version accepts a list, and paths with spaces
        need no quoting.
        """
        commands: list[list[str]] = []
        if self.pip_no_deps:
            commands.append(["--no-deps", *self.pip_no_deps])
        if self.pip_constrained:
            prefix = ["-c", str(constraints_file)] if self.constraints else []
            commands.append([*prefix, *self.pip_constrained])
        return commands

    def confirmation_text(self) -> str:
        """The one question asked before installing anything: what, from where, and what changes."""
        lines = ["MultiscaleDiffSeg needs these Python packages, which are not installed yet:", ""]
        lines += [f"  - {item}" for item in self.items]
        lines += ["", "Slicer's own numpy, SimpleITK, scipy and VTK are not changed."]
        if self.torch_action != "none":
            lines.append("PyTorch is the large download (over 100 MB, more with CUDA libraries); "
                         "the other packages are a few MB.")
        lines.append("Install now?")
        return "\n".join(lines)


def _version(text: str | None) -> Version | None:
    if not text:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _accepts(spec: str, version: str | None) -> bool:
    parsed = _version(version)
    return parsed is not None and SpecifierSet(spec).contains(parsed, prereleases=True)


def monai_pin(torch_version: str | None) -> str:
    """The MONAI version to install for the installed torch (newest pin if torch is unknown)."""
    parsed = _version(torch_version)
    if parsed is None:
        return MONAI_PINS[0][1]
    for minimum, pin in MONAI_PINS:
        if parsed.release >= Version(minimum).release:
            return pin
    return MONAI_PINS[-1][1]


def pypi_torch_build(env: Environment) -> str:
    """Which build of torch PyPI gives this platform (what the user gets without the extension)."""
    if env.system == "Windows":
        return ("the CPU-only build (PyPI has no CUDA build for Windows): an NVIDIA GPU will not be used; "
                "install the PyTorch extension first to get the CUDA build")
    if env.system == "Darwin":
        return (f"the Apple-silicon build (torch {TORCH.pin} needs macOS 14 or newer), "
                "which uses the GPU through MPS")
    if env.system == "Linux" and env.machine.lower() in ("x86_64", "amd64"):
        return ("the CUDA build, with NVIDIA's CUDA libraries as separate pip packages (nvidia-*); "
                "it also runs on computers without an NVIDIA GPU")
    return f"the build PyPI offers for {env.system} {env.machine}"


def plan_installation(env: Environment) -> InstallPlan:
    """Decide what to install for ``env``; pure function of its input (unit-tested)."""
    plan = InstallPlan()
    versions = env.versions
    if tuple(env.python) < MINIMUM_PYTHON:
        plan.problems.append(
            f"Slicer's Python {env.python[0]}.{env.python[1]} is too old: the core and its pinned packages need "
            f"Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or newer, which Slicer 5.10 and later provide. "
            "Please install a newer Slicer"
        )
    for module, dist in PROTECTED:
        if not env.importable.get(module, True):
            plan.problems.append(
                f"{module} is missing from Slicer's Python; it is part of Slicer and is not installed by "
                "this module: reinstall Slicer"
            )
    torch_version = versions.get(TORCH.distribution)
    if not _accepts(TORCH.accept, torch_version):
        if torch_version:
            plan.torch_reason = f"installed torch {torch_version} is too old (need {TORCH.accept})"
        else:
            plan.torch_reason = "torch is not installed"
        if env.intel_mac:
            plan.problems.append(
                f"PyTorch {TORCH.accept} is not available for Intel Macs: PyPI's last PyTorch for macOS on x86_64 "
                f"is {LAST_TORCH_FOR_INTEL_MAC}. MultiscaleDiffSeg needs a Mac with Apple silicon (running the "
                "Apple-silicon build of Slicer, not the Intel build under Rosetta), Windows or Linux")
        elif env.pytorch_extension:
            plan.torch_action = "pytorch_extension"
            plan.items.append(f"PyTorch {TORCH.accept} via the PyTorch extension (PyTorchUtils): "
                              + PYTORCH_EXTENSION_INSTALLS)
        else:
            plan.torch_action = "pip"
            plan.items.append(f"PyTorch {TORCH.pin} from PyPI ({TORCH.purpose.split(': ', 1)[1]}): "
                              + pypi_torch_build(env))
    for dep in PIP_DEPENDENCIES:
        current = versions.get(dep.distribution)
        if _accepts(dep.accept, current):
            continue
        pin = monai_pin(torch_version if plan.torch_action == "none" else None) if dep.distribution == "monai" else dep.pin
        spec = f"{dep.distribution}=={pin}"
        (plan.pip_no_deps if dep.no_deps else plan.pip_constrained).append(spec)
        note = f" (replaces {current})" if current else ""
        plan.items.append(f"{spec}{note} - {dep.purpose.split(': ', 1)[1]}")
    plan.constraints = constraint_lines(versions)
    return plan


def constraint_lines(versions: Mapping[str, str | None], include_torch: bool = True) -> list[str]:
    """``name==version`` for each installed protected package and torch (pip ``-c`` file).

    ``include_torch=False`` for the command that installs torch itself (an old torch that is
    being upgraded must not be pinned).
    """
    lines = []
    for _, dist in PROTECTED:
        if dist and versions.get(dist):
            lines.append(f"{dist}=={versions[dist]}")
    if include_torch and versions.get(TORCH.distribution):
        lines.append(f"{TORCH.distribution}=={versions[TORCH.distribution]}")
    return lines


def write_constraints(lines: Iterable[str], folder: str | os.PathLike, name: str = "msdseg-constraints.txt") -> Path:
    """Write a constraints file for pip's ``-c`` option."""
    path = Path(folder) / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def torch_pip_command(constraints_file: str | os.PathLike | None = None) -> list[str]:
    """pip arguments for torch without the PyTorch extension (the build PyPI ships for the OS).

    The constraints keep numpy, SimpleITK and scipy as they are (torch does not need them, but a
    resolver upgrade of an unrelated shared dependency must not pull them along).
    """
    prefix = ["-c", str(constraints_file)] if constraints_file else []
    return [*prefix, TORCH.install_spec]


# --------------------------------------------------------------------------- pip's own reason
#: At most this many lines of the installer's output are shown (pip's ERROR block is usually short).
REASON_LINES = 12

T = TypeVar("T")


class InstallError(RuntimeError):
    """An installer step failed; the text is the installer's own reason (pip's ERROR lines)."""


class _Recorder(io.TextIOBase):
    """Passes everything on to ``target`` and keeps a copy: what Slicer prints while pip runs."""

    def __init__(self, target: TextIO | None) -> None:
        super().__init__()
        self.target = target
        self.chunks: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.chunks.append(text)
        if self.target is not None:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def text(self) -> str:
        return "".join(self.chunks)


def pip_reason(output: str) -> str:
    """pip's own reason in its output: from its first ``ERROR:`` line on, else the last lines."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [index for index, line in enumerate(lines) if line.startswith("ERROR:")]
    chosen = lines[errors[0]:] if errors else lines[-5:]
    return "\n".join(chosen[-REASON_LINES:])


def _attached_output(exc: BaseException) -> str:
    """Output the exception carries itself (``subprocess.run(capture_output=True)`` attaches it;
    Slicer 5.10's ``logProcessOutput`` attaches the already-read pipe object, which is skipped)."""
    parts = []
    for name in ("output", "stderr"):
        value = getattr(exc, name, None)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str):
            parts.append(value)
    return "\n".join(parts)


def run_recorded(action: Callable[[], T], what: str) -> T:
    """Run one installer step, recording what it prints; on failure raise :class:`InstallError`
    with the installer's own reason instead of "Command [...] returned non-zero exit status 1"."""
    recorder = _Recorder(sys.stdout)
    try:
        with contextlib.redirect_stdout(recorder):
            return action()
    except Exception as exc:
        printed = pip_reason(recorder.text() + "\n" + _attached_output(exc))
        if isinstance(exc, subprocess.CalledProcessError):
            reason = printed or (f"{what} exited with status {exc.returncode} and printed no reason "
                                 "(see Slicer's Python console)")
        else:
            reason = f"{what}: {exc}" + (f"\n{printed}" if "ERROR:" in printed else "")
        raise InstallError(reason) from exc


def run_pip(pip_install: Callable[[list[str]], object], args: list[str]) -> None:
    """``pip_install(args)`` (``slicer.util.pip_install`` in Slicer) with pip's reason on failure."""
    run_recorded(lambda: pip_install(args), "pip install " + " ".join(args))


# --------------------------------------------------------------------------- failures
def failure_advice(plan: InstallPlan, error: str = "") -> str:
    """What to tell the user when an install failed: the installer's reason and what to do next."""
    reason = (error or "").strip().splitlines() or ["the installer did not report a reason"]
    manual = plan.pip_no_deps + plan.pip_constrained
    if len(reason) == 1:
        lines = [f"Installing the Python packages failed: {reason[0]}"]
    else:
        lines = ["Installing the Python packages failed. The installer said:", *(f"    {line}" for line in reason)]
    steps = ["Check the internet connection. Behind a proxy, start Slicer with HTTPS_PROXY set "
             "(for example HTTPS_PROXY=http://proxy.example.org:8080) and try again."]
    if plan.torch_action == "pytorch_extension":
        steps.append("Install PyTorch in the 'PyTorch Util' module (Extensions Manager: PyTorch), "
                     f"with version requirement {TORCH.accept}, then restart Slicer.")
    elif plan.torch_action == "pip":
        steps.append("Install the PyTorch extension from the Extensions Manager and restart Slicer; it picks "
                     "the right CUDA build for your GPU.")
    if manual:
        commands = []
        if plan.pip_no_deps:
            commands.append(f"slicer.util.pip_install({['--no-deps', *plan.pip_no_deps]!r})")
        if plan.pip_constrained:
            commands.append(f"slicer.util.pip_install({plan.pip_constrained!r})")
        steps.append("Or install by hand in Slicer's Python console, then restart Slicer:"
                     + "".join(f"\n       {command}" for command in commands))
    steps.append("Offline computers: see 'Offline computers' in the extension's user guide (docs/slicer_extension.md).")
    lines += ["", "What to do next:", *(f"  {number}. {step}" for number, step in enumerate(steps, 1))]
    return "\n".join(lines)


def missing_summary(plan: InstallPlan) -> str:
    """One line naming what is still missing after an install attempt (empty when nothing is)."""
    parts = []
    if plan.torch_action != "none":
        parts.append(plan.torch_reason or "torch")
    parts += plan.pip_no_deps + plan.pip_constrained
    parts += plan.problems
    return "; ".join(parts)


def describe(env: Environment) -> str:
    """Versions for the log and bug reports."""
    return ", ".join(f"{k} {v or 'missing'}" for k, v in sorted(env.versions.items()))


def ensure(
    env_probe: Callable[[], Environment],
    confirm: Callable[[str], bool],
    install_torch_extension: Callable[[str], bool],
    pip_install: Callable[[list[str]], None],
    temp_folder: str | os.PathLike,
    log: Callable[[str], None] = lambda text: None,
) -> InstallPlan:
    """Check, ask once, install, check again; the sequence behind the module's dependency step.

    The side effects are injected so the whole sequence runs in tests without Slicer; in Slicer they
    are ``probe_environment``, ``slicer.util.confirmOkCancelDisplay``, ``PyTorchUtils`` and
    ``slicer.util.pip_install``.  Returns the final plan (``ok`` when nothing is missing);
    raises ``RuntimeError`` with :func:`failure_advice` when installing failed or was declined.
    """
    plan = plan_installation(env_probe())
    if plan.problems:
        raise RuntimeError("\n".join(plan.problems))
    if not plan.needed:
        return plan
    if not confirm(plan.confirmation_text()):
        raise RuntimeError("The required Python packages were not installed (declined). "
                           "MultiscaleDiffSeg cannot segment without them.\n\n" + failure_advice(plan, "declined"))
    try:
        if plan.torch_action == "pytorch_extension":
            log(f"Installing PyTorch {TORCH.accept} with the PyTorch extension...")
            if not run_recorded(lambda: install_torch_extension(TORCH.accept), "the PyTorch extension's installer"):
                raise InstallError("the PyTorch extension did not install torch")
        elif plan.torch_action == "pip":
            log(f"Installing {TORCH.install_spec} from PyPI...")
            before = env_probe().versions
            torch_constraints = write_constraints(
                constraint_lines(before, include_torch=False), temp_folder, "msdseg-torch-constraints.txt")
            run_pip(pip_install, torch_pip_command(torch_constraints))
        # torch may have changed: decide the MONAI pin and the constraints again
        plan_after_torch = plan_installation(env_probe())
        constraints = write_constraints(plan_after_torch.constraints, temp_folder)
        for args in plan_after_torch.pip_commands(constraints):
            log("pip install " + " ".join(args))
            run_pip(pip_install, args)
    except Exception as exc:  # noqa: BLE001 - any installer failure becomes advice for the user
        raise RuntimeError(failure_advice(plan, str(exc))) from exc
    final = plan_installation(env_probe())
    if final.needed or final.problems:
        raise RuntimeError(failure_advice(final, "still missing after installing: " + missing_summary(final)))
    return final


def requirement_names() -> Iterable[str]:
    """All distributions the module may install (for documentation and tests)."""
    return [TORCH.distribution] + [d.distribution for d in PIP_DEPENDENCIES]

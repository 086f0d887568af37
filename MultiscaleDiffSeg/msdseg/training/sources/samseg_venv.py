"""A private virtual environment for SAMSEG, whose compiled bindings pin numpy<2.

Created once under the cache folder and reused while its pins are unchanged.  SAMSEG is installed
from the already downloaded wheel (``--find-links``) so the atlas that is rasterised is the very one
whose hash the manifest records; only its pure dependencies come from the index.  ``pip freeze`` of
the venv is recorded for provenance.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

#: What must be exact for the rasterised priors to be reproducible.
VENV_PINS = ("samseg==0.4a0", "numpy==1.26.4")
VENV_NAME = "samseg-venv"
_STAMP = "msdseg-pins.txt"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def _usable(venv: Path) -> bool:
    stamp = venv / _STAMP
    if not venv_python(venv).exists() or not stamp.exists() or stamp.read_text() != "\n".join(VENV_PINS):
        return False
    proc = subprocess.run([str(venv_python(venv)), "-c", "import samseg.gems"], capture_output=True)
    return proc.returncode == 0


def ensure_samseg_venv(cache_dir: Path, wheel_dir: Path) -> Path:
    """Path of the venv's python, creating the venv (slow: pip builds ``surfa`` from source) when needed."""
    venv = Path(cache_dir) / VENV_NAME
    if _usable(venv):
        return venv_python(venv)
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the SAMSEG venv")
    _run([str(venv_python(venv)), "-m", "pip", "install", "--find-links", str(wheel_dir), *VENV_PINS],
         "installing SAMSEG into its venv")
    (venv / _STAMP).write_text("\n".join(VENV_PINS))
    return venv_python(venv)


def venv_freeze(python: Path) -> list[str]:
    out = _run([str(python), "-m", "pip", "freeze", "--all"], "pip freeze in the SAMSEG venv")
    return sorted(line.strip() for line in out.splitlines() if line.strip())

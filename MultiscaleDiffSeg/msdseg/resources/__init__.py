"""Files that ship inside the package: the label tree, the model, and sample T1 images."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

#: The demo's T1: the MNI152 ICBM 2009 template at 1 mm (see samples/README.md for its licence).
SAMPLE_T1 = "mni152_t1.nii.gz"


def sample_t1_path() -> Path:
    """The shipped 1 mm sample T1 (read-only: copy it before writing next to it)."""
    return Path(str(resources.files("msdseg.resources") / "samples" / SAMPLE_T1))

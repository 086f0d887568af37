"""msdseg: multiscale 3D diffusion segmentation of T1-weighted brain MRI (Qt-free, Slicer-free core).

The public API (docs/console_api.md)::

    import msdseg
    result = msdseg.segment_file("T1.nii.gz", msdseg.SegmentSettings(preset="fast"), output_dir="out")
    result.volumes["left_hippocampus"], result.labels, result.uncertainty, result.info

Names load on first use, so ``import msdseg`` and its settings work without torch (a front end's
GUI process can build and validate settings before the worker that runs the network starts).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "segment_image": "msdseg.inference.pipeline",
    "SegmentationResult": "msdseg.inference.pipeline",
    "segment_file": "msdseg.outputs.files",
    "SegmentSettings": "msdseg.core.settings",
    "Preset": "msdseg.core.settings",
    "PRESETS": "msdseg.core.settings",
    "DEFAULT_PRESET": "msdseg.core.settings",
    "load_model": "msdseg.model.modelfile",
    "load_tree": "msdseg.core.labels",
    "LabelTree": "msdseg.core.labels",
    "load_volume": "msdseg.core.io",
    "write_case_outputs": "msdseg.outputs.writers",
    "InputError": "msdseg.core.errors",
    "Cancelled": "msdseg.core.errors",
}
__all__ = [
    "DEFAULT_PRESET", "PRESETS", "Cancelled", "InputError", "LabelTree", "Preset", "SegmentSettings",
    "SegmentationResult", "__version__", "load_model", "load_tree", "load_volume", "segment_file",
    "segment_image", "write_case_outputs",
]
assert set(__all__) == set(_EXPORTS) | {"__version__"}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from msdseg.core.errors import Cancelled, InputError
    from msdseg.core.io import load_volume
    from msdseg.core.labels import LabelTree, load_tree
    from msdseg.core.settings import DEFAULT_PRESET, PRESETS, Preset, SegmentSettings
    from msdseg.outputs.files import segment_file
    from msdseg.inference.pipeline import SegmentationResult, segment_image
    from msdseg.model.modelfile import load_model
    from msdseg.outputs.writers import write_case_outputs


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'msdseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Segment a file on disk and, when asked, write the standard outputs next to it or elsewhere."""
from __future__ import annotations

import os

from msdseg.core.io import case_stem, load_volume
from msdseg.core.settings import SegmentSettings
from msdseg.inference.pipeline import CancelFn, ProgressFn, SegmentationResult, segment_image
from msdseg.outputs.writers import write_case_outputs


def segment_file(
    path: str | os.PathLike,
    settings: SegmentSettings | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> SegmentationResult:
    """Read ``path`` (NIfTI, NRRD, MHA, MGZ), segment it, and with ``output_dir`` write
    ``S_labels.nii.gz``, ``S.seg.nrrd``, ``S_volumes.csv`` (and ``S_uncertainty.nii.gz`` when
    ``settings.uncertainty``) there, atomically; ``result.info["files"]`` then names them.  The
    input file is never modified.  Cohorts with resume, workers and reports: ``msdseg segment``."""
    result = segment_image(load_volume(path), settings, progress=progress, cancel=cancel)
    if output_dir is not None:
        files = write_case_outputs(result, output_dir, case_stem(path))
        result.info["files"] = {kind: str(p) for kind, p in files.items()}
    return result

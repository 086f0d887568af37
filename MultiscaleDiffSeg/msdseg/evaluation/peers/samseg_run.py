"""Run FreeSurfer's SAMSEG on a T1 and convert its segmentation to our aseg leaves on the input grid.

Why a separate virtual environment: the ``samseg`` wheel's compiled bindings pin ``numpy<2``, which
cannot share an environment with our stack.  :func:`msdseg.training.sources.samseg_venv.ensure_samseg_venv`
builds (once) and finds that venv; this module only calls its ``run_samseg`` console script.

Measured: wall time of the whole ``run_samseg`` process and its peak resident memory
(``ru_maxrss`` from ``os.wait4`` of that very child, so other processes on the machine do not
count).  Conversion: SAMSEG writes ``seg.mgz`` in FreeSurfer numbering; labels that are ours are
kept, structures we fold (choroid plexus, WM hypointensities, corpus callosum) are folded as the
training data were (:func:`msdseg.training.sources.labelmap.map_freesurfer`), everything else (skull, scalp,
vessels, optic chiasm, ...) becomes background, and the map is put on the exact input grid with
nearest-neighbour resampling so it compares voxel by voxel with ``msdseg segment``'s output.
Careful: SAMSEG's label 24 ("CSF") covers all intracranial CSF, aseg's label 24 only a sliver, so the
``csf`` leaf (and totals containing it: brain, midline) are not comparable (:data:`CSF_NOTE`).

Usage::

    python -m msdseg.evaluation.peers.samseg_run T1.nii.gz -o OUTDIR [--threads 1] [--nice 15]

writes ``OUTDIR/samseg/`` (SAMSEG's own files), ``OUTDIR/samseg_labels.nii.gz`` (our numbering, input
grid), ``OUTDIR/samseg_volumes.csv`` and ``OUTDIR/samseg_run.json`` (command, seconds, peak memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: Why the CSF leaf must be left out of a comparison with SAMSEG (see the module doc).
CSF_NOTE = ("SAMSEG's label 24 (CSF) is all intracranial CSF (sulci, cisterns; ~500 mL on fsaverage), "
            "FreeSurfer aseg's label 24 only a few mL: exclude the csf leaf and the brain/midline totals "
            "when comparing volumes or Dice")
#: Where ``prepare-data`` keeps the venv and SAMSEG's wheel (reused, never rebuilt needlessly).
DEFAULT_CACHE = Path(os.environ.get("MSDSEG_WHEEL_CACHE", "/tmp/wheels"))


def samseg_executable(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """``run_samseg`` of the private venv, building the venv from the cached wheel when needed."""
    from msdseg.training.sources.samseg_venv import ensure_samseg_venv

    python = ensure_samseg_venv(cache_dir, cache_dir)
    exe = python.parent / "run_samseg"
    if not exe.exists():
        raise FileNotFoundError(f"{exe}: SAMSEG's venv has no run_samseg script")
    return exe


def run_measured(cmd: list[str], log_path: Path, nice: int = 0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; returns exit status, wall seconds, CPU seconds and peak RSS (MiB).

    ``os.wait4`` gives the rusage of this one child (including its waited-for descendants), unlike
    ``getrusage(RUSAGE_CHILDREN)``, which mixes in every child this process ever had.
    """
    def lower_priority() -> None:
        if nice:
            os.nice(nice)

    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lower_priority)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024.0, 1),  # Linux reports KiB
    }


def read_label_mgz(path: Path) -> sitk.Image:
    """SAMSEG's ``seg.mgz`` as a SimpleITK image.

    Read with nibabel and converted to native byte order here: MGZ data are big-endian, which
    SimpleITK's array bridge rejects for anything wider than a byte.
    """
    import nibabel as nib

    from msdseg.core.io import image_from_ras_affine

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    return image_from_ras_affine(data.astype(data.dtype.newbyteorder("="), copy=False), img.affine)


def samseg_to_aseg(seg: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """SAMSEG's FreeSurfer-numbered map -> our 32 aseg leaves (uint16) on ``reference``'s grid."""
    from msdseg.core.labels import load_tree
    from msdseg.training.sources.labelmap import GEN_ONLY_OFFSET, IGNORE, apply_table, freesurfer_table, resolve_nearest_wm

    tree = load_tree()
    arr = sitk.GetArrayFromImage(seg).astype(np.int64)
    values = [int(v) for v in np.unique(arr)]
    try:
        table = freesurfer_table(values, tree)
    except ValueError:  # a label we have no rule for: background, rather than failing the comparison
        known = []
        for v in values:
            try:
                freesurfer_table([v], tree)
                known.append(v)
            except ValueError:
                pass
        table = {**{v: 0 for v in values}, **freesurfer_table(known, tree)}
    mapped = apply_table(arr, table)
    mapped = resolve_nearest_wm(mapped, tree, seg.GetSpacing()[::-1])
    mapped[(mapped == IGNORE) | (mapped >= GEN_ONLY_OFFSET)] = 0
    out = sitk.GetImageFromArray(mapped.astype(np.uint16))
    out.CopyInformation(seg)
    return sitk.Resample(out, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)


def run_samseg(t1: Path, outdir: Path, threads: int = 1, nice: int = 0, cache_dir: Path = DEFAULT_CACHE,
               convert_only: bool = False) -> dict[str, Any]:
    """Run SAMSEG on ``t1``, convert its labels and write the files listed in the module doc.

    The measurement is saved before the conversion, so a conversion problem never costs a rerun;
    ``convert_only`` converts an existing ``OUTDIR/samseg/seg.mgz`` again without running SAMSEG.
    """
    from msdseg.core.io import read_image

    t1 = Path(t1).resolve()
    outdir = Path(outdir).resolve()
    samseg_dir = outdir / "samseg"
    samseg_dir.mkdir(parents=True, exist_ok=True)
    reference = read_image(t1)  # validates the input before the long SAMSEG run (docs/benchmarks.md)
    record_path = outdir / "samseg_run.json"
    if convert_only:
        record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
        record.pop("error", None)
    else:
        cmd = [str(samseg_executable(cache_dir)), "--input", str(t1), "--output", str(samseg_dir),
               "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
        measured = run_measured(cmd, outdir / "samseg_log.txt", nice=nice, env=env)
        record = {"command": cmd, "threads": threads, "nice": nice, "input": str(t1),
                  "input_size": list(reference.GetSize()), **measured}
        record_path.write_text(json.dumps(record, indent=1))
    seg_path = samseg_dir / "seg.mgz"
    if record.get("returncode", 0) != 0 or not seg_path.exists():
        record["error"] = f"run_samseg failed (exit {record.get('returncode')}); see {outdir / 'samseg_log.txt'}"
    else:
        record.update(convert_outputs(seg_path, reference, outdir))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def convert_outputs(seg_path: Path, reference: sitk.Image, outdir: Path) -> dict[str, Any]:
    """``samseg_labels.nii.gz`` + ``samseg_volumes.csv`` in our numbering on the input grid."""
    from msdseg.core.labels import load_tree
    from msdseg.core.volumes import structure_volumes, write_volumes_csv

    labels = samseg_to_aseg(read_label_mgz(seg_path), reference)
    sitk.WriteImage(labels, str(outdir / "samseg_labels.nii.gz"), useCompression=True)
    tree = load_tree()
    volumes = structure_volumes(sitk.GetArrayViewFromImage(labels), labels.GetSpacing(), tree)
    write_volumes_csv(outdir / "samseg_volumes.csv", volumes, tree)
    return {"brain_ml": round(volumes[tree.root.id], 1), "labels": str(outdir / "samseg_labels.nii.gz"),
            "csf_note": CSF_NOTE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.peers.samseg_run", description=__doc__.split("\n\n")[0])
    p.add_argument("t1", help="T1-weighted input image")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=0, help="lower SAMSEG's CPU priority by this much")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder holding the SAMSEG wheel and venv")
    p.add_argument("--convert-only", action="store_true", help="only convert an existing OUTDIR/samseg/seg.mgz")
    args = p.parse_args(argv)
    record = run_samseg(Path(args.t1), Path(args.output), args.threads, args.nice, Path(args.cache),
                        args.convert_only)
    print(json.dumps(record, indent=1))
    return 0 if "error" not in record else 1


if __name__ == "__main__":
    sys.exit(main())

"""SAMSEG's probabilistic atlas: a whole-head label map plus priors to sample new label maps from.

The atlas is a tetrahedral mesh whose nodes carry class probabilities ("alphas").  Rasterising it
(in SAMSEG's venv, :mod:`samseg_rasterize`) gives per-class priors on the grid of the atlas's
``template.nii.gz``.  Here we

1. map the 44 compressed classes to our output values through ``compressionLookupTable.txt`` and
   :func:`labelmap.freesurfer_table` (one FreeSurfer label per class in this atlas; a class shared
   by labels with different outputs is refused rather than guessed), except that SAMSEG's CSF is
   extracerebral CSF, not the aseg ``csf`` leaf (:func:`samseg_table`);
2. give WM-hypointensity mass (no side) to the white matter of the nearest hemisphere, with sides
   taken from the argmax of the raw classes;
3. sum the class priors of each output value, normalise so each voxel sums to 1 (outside the mesh
   everything is background), reorient to RAS and crop like every other map;
4. write the argmax at 1 mm as ``samseg/samseg_atlas_labels.nii.gz`` and the priors averaged over
   2x2x2 blocks as ``samseg/priors_2mm.npz`` (:mod:`atlas_priors`, the contract shared with the
   GCA source).

Classes are streamed one at a time from a memory-mapped file, so memory stays near a few volumes.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from msdseg.training.sources.atlas_priors import affine_2mm, write_prior_atlas  # noqa: F401 (affine_2mm: re-exported)
from msdseg.training.sources.common import Context, copy_licences
from msdseg.training.sources.grid import apply_box, crop_box, reorient_to_ras
from msdseg.training.sources.labelmap import (LEFT_WM, NEAREST_WM, RIGHT_WM, apply_table, freesurfer_table,
                                              nearest_side, side_map)
from msdseg.training.sources.manifest import MapEntry
from msdseg.training.sources.output import write_json
from msdseg.training.sources.samseg_venv import ensure_samseg_venv, venv_freeze
from msdseg.training.sources.wheels import PINS, WheelReader

ATLAS_DIR = "samseg/atlas/20Subjects_smoothing2_down2_smoothingForAffine2/"
MESH = "atlas_level2.txt.gz"
SCRIPT = Path(__file__).with_name("samseg_rasterize.py")
FULL = 65535.0


def read_compression_lut(text: str) -> dict[int, list[tuple[int, str]]]:
    """compressed class -> [(FreeSurfer label, name), ...] from ``compressionLookupTable.txt``."""
    out: dict[int, list[tuple[int, str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].lstrip("-").isdigit():
            out.setdefault(int(fields[1]), []).append((int(fields[0]), fields[2]))
    return dict(sorted(out.items()))


def class_outputs(lut: dict[int, list[tuple[int, str]]], table: dict[int, int]) -> dict[int, int]:
    """compressed class -> output value (possibly :data:`NEAREST_WM`)."""
    out: dict[int, int] = {}
    for cls, members in lut.items():
        values = {table[fs] for fs, _ in members}
        if len(values) != 1:
            raise ValueError(f"SAMSEG class {cls} mixes labels with different outputs: {members}")
        out[cls] = values.pop()
    return out


def rasterise(python: Path, mesh: Path, shape: tuple[int, ...], out: Path) -> dict:
    """Run :mod:`samseg_rasterize` in the venv; returns its JSON report."""
    cmd = [str(python), str(SCRIPT), "--mesh", str(mesh), "--shape", *map(str, shape), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"SAMSEG rasterisation failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def block_mean_2(vol: np.ndarray) -> np.ndarray:
    """Average over 2x2x2 blocks (dimensions must be even)."""
    x, y, z = vol.shape
    return vol.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5), dtype=np.float32)


#: SAMSEG's "CSF" class (FreeSurfer number 24) is all CSF outside the ventricles, about 400 mL
#: between brain and skull.  FreeSurfer's aseg gives 24 to a few mL near the basal cisterns and
#: leaves the rest unlabelled, and that is what the ``csf`` leaf means everywhere else (training
#: maps and the held-out aseg alike).  Taken at face value the SAMSEG maps would teach that the
#: layer outside the cortex is brain; instead it becomes extracerebral CSF, painted but not a leaf.
SAMSEG_CSF, EXTRACEREBRAL_CSF = 24, 257


def samseg_table(values, tree) -> dict[int, int]:
    """:func:`labelmap.freesurfer_table` with SAMSEG's CSF read as extracerebral CSF (see above)."""
    table = freesurfer_table(values, tree)
    if SAMSEG_CSF in table:
        table[SAMSEG_CSF] = freesurfer_table([EXTRACEREBRAL_CSF], tree)[EXTRACEREBRAL_CSF]
    return table


def build_samseg(ctx: Context, wheel: WheelReader, cache_dir: Path) -> tuple[list[MapEntry], dict]:
    pin = PINS["samseg"]
    lic = copy_licences(ctx, "samseg", wheel, [wheel.dist_info("METADATA"), ATLAS_DIR + "README"])
    template = wheel.image(ATLAS_DIR + "template.nii.gz")
    lut = read_compression_lut(wheel.text(ATLAS_DIR + "compressionLookupTable.txt"))
    table = samseg_table([fs for members in lut.values() for fs, _ in members], ctx.tree)
    outputs = class_outputs(lut, table)
    class_fs = np.array([lut[c][0][0] for c in range(len(lut))], np.int32)
    if sorted(lut) != list(range(len(lut))):
        raise ValueError("SAMSEG lookup table: compressed classes are not 0..K-1")

    ctx.report(0.0, "samseg: preparing its virtual environment")
    python = ensure_samseg_venv(cache_dir, wheel.path.parent)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="samseg-raster-") as tmp:
        mesh = Path(tmp) / MESH
        mesh.write_bytes(wheel.read(ATLAS_DIR + MESH))
        raw_path = Path(tmp) / "priors.npy"
        ctx.report(0.2, "samseg: rasterising the atlas mesh")
        start = time.time()
        info = rasterise(python, mesh, template.shape[:3], raw_path)
        info["wall_seconds"] = round(time.time() - start, 2)
        raw = np.load(raw_path, mmap_mode="r")
        if raw.shape[0] != len(lut):
            raise ValueError(f"SAMSEG: {raw.shape[0]} rasterised classes, {len(lut)} in the lookup table")
        ctx.report(0.5, "samseg: merging priors")
        entry, extras = _merge_and_write(ctx, raw, template.affine, class_fs, outputs, table)
    entry.licence, entry.licence_files = pin.licence, lic
    extras["venv_freeze"] = venv_freeze(python)
    write_json(ctx.out_dir / "samseg" / "build_info.json", info)  # timings: not part of the manifest
    ctx.report(1.0, f"samseg: done (rasterised in {info['rasterise_seconds']} s)")
    return [entry], extras


def _merge_and_write(ctx: Context, raw: np.ndarray, affine: np.ndarray, class_fs: np.ndarray,
                     outputs: dict[int, int], table: dict[int, int]) -> tuple[MapEntry, dict]:
    n_cls = raw.shape[0]
    # pass 1: per-voxel totals and the argmax of the raw classes (for sides and the crop box)
    total = np.zeros(raw.shape[1:], np.float32)
    best = np.full(raw.shape[1:], -1.0, np.float32)
    arg = np.zeros(raw.shape[1:], np.int16)
    for c in range(n_cls):
        slab = np.asarray(raw[c], np.float32)
        total += slab
        better = slab > best
        best[better], arg[better] = slab[better], c
    outside = total <= 0
    arg[outside] = int(np.flatnonzero(class_fs == 0)[0])
    raw_out = apply_table(class_fs[arg], table)
    near = nearest_side(side_map(raw_out, ctx.tree))
    canon_out, canon_affine = reorient_to_ras(raw_out, affine)
    lo, hi = crop_box(canon_out != 0)
    hi = hi + (hi - lo) % 2  # even size so 2x2x2 blocks tile the crop exactly
    norm = np.where(outside, 1.0, 1.0 / np.maximum(total, 1.0)).astype(np.float32)
    del best, total

    labels_out = sorted({v for v in outputs.values() if v != NEAREST_WM} |
                        ({LEFT_WM, RIGHT_WM} if NEAREST_WM in outputs.values() else set()))
    priors_2mm: list[np.ndarray] = []
    run_best: np.ndarray | None = None
    run_arg: np.ndarray | None = None
    for value in labels_out:
        slab = np.zeros(raw.shape[1:], np.float32)
        for c, out in outputs.items():
            if out == value:
                slab += raw[c]
            elif out == NEAREST_WM and value in (LEFT_WM, RIGHT_WM):
                side = 1 if value == LEFT_WM else 2
                slab += np.where(near == side, np.asarray(raw[c], np.float32), 0.0)
        slab *= norm
        if value == 0:
            slab[outside] = 1.0
        canon, _ = reorient_to_ras(slab, affine)
        crop, out_affine = apply_box(canon, canon_affine, lo, hi, fill=1.0 if value == 0 else 0.0)
        if run_best is None:
            run_best, run_arg = crop.copy(), np.full(crop.shape, value, np.uint16)
        else:
            better = crop > run_best
            run_best[better], run_arg[better] = crop[better], value  # type: ignore[index]
        priors_2mm.append(block_mean_2(crop).astype(np.float16))
    assert run_arg is not None
    entry, extras = write_prior_atlas(ctx, source="samseg", name="samseg_atlas", label_map=run_arg,
                                      affine_1mm=out_affine, priors_2mm=np.stack(priors_2mm),
                                      labels=labels_out, origin=ATLAS_DIR + MESH)
    extras["compressed_classes"] = int(n_cls)
    return entry, extras

"""Rasterise the SAMSEG atlas mesh into per-class prior volumes.  Runs in SAMSEG's own venv.

SAMSEG's compiled ``gems`` bindings need numpy<2, which our environment does not have, so
:mod:`msdseg.training.sources.samseg_priors` runs this file with the venv's interpreter.  It therefore imports
nothing from msdseg and uses only numpy 1.x API.  Output: a ``.npy`` of shape (classes, X, Y, Z),
uint16 (each voxel's classes sum to about 65535), on the voxel grid of the atlas's
``template.nii.gz``; and one JSON line on stdout (the last line) with facts for the record.
"""
import argparse
import json
import sys
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", required=True, help="atlas_level2.txt.gz")
    parser.add_argument("--shape", required=True, nargs=3, type=int, help="template.nii.gz shape")
    parser.add_argument("--out", required=True, help="output .npy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import samseg.gems as gems

    gems.setGlobalDefaultNumberOfThreads(args.threads)
    start = time.time()
    collection = gems.KvlMeshCollection()
    collection.read(args.mesh)
    positions = np.asarray(collection.reference_position)
    mesh = collection.reference_mesh
    read_s = time.time() - start
    start = time.time()
    priors = mesh.rasterize([int(s) for s in args.shape], -1)  # (X, Y, Z, classes) uint16
    raster_s = time.time() - start
    priors = np.ascontiguousarray(np.moveaxis(priors, -1, 0))
    np.save(args.out, priors)
    info = {
        "read_seconds": round(read_s, 2),
        "rasterise_seconds": round(raster_s, 2),
        "classes": int(priors.shape[0]),
        "shape": [int(s) for s in priors.shape[1:]],
        "dtype": str(priors.dtype),
        "mesh_points": int(mesh.point_count),
        "position_min": [float(v) for v in positions.min(0)],
        "position_max": [float(v) for v in positions.max(0)],
        "numpy": np.__version__,
    }
    sys.stdout.write("\n" + json.dumps(info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
